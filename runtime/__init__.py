"""pladis.runtime: engines in a diffusers scheduler loop, and step-by-step parity against eager PyTorch.

Planned (issue 4). Nothing runs from this package yet.
"""
