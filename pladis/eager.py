"""The patched eager pipeline an export folder was made from, rebuilt from its manifest: the reference the
``torch`` backend runs and the model ``pladis build --backend aoti`` compiles."""

from __future__ import annotations

import functools
from pathlib import Path

import torch


@functools.lru_cache(maxsize=2)
def eager_components(folder: str, device: str, loras: tuple = ()) -> dict:
    """{component name: export contract component} of the export in ``folder``, each module on ``device`` in
    the dtype it was exported in (same source, checked unchanged, same seed, LoRAs and PLADIS settings).
    ``loras``: ``(path, scale, sha256)`` of LoRAs swapped onto the engine (``pladis.runtime.lora``), fused after
    the export's own by diffusers' loader on the real pipeline: the reference of a swap (``pladis parity
    --lora``)."""
    import pladis
    from pladis import patch, provenance
    from pladis.export import contracts
    from pladis.manifest import read_manifest
    from pladis.precision import torch_dtype

    m = read_manifest(folder, verify=False)
    # the same source, checked unchanged, with the same LoRAs fused (SourceChanged if moved or changed)
    entry = dict(m.model)
    entry["loras"] = [*entry.get("loras", []), *({"file": Path(p).name, "path": p, "scale": s, "sha256": h}
                                                 for p, s, h in loras)]  # fmt: skip
    pipe = provenance.load_recorded(entry, seed=m.seed, dtype=torch_dtype(m.precision))
    if m.pladis.patched:
        pladis.apply(pipe, lam=m.pladis.lam, alpha=m.pladis.alpha, layers=m.pladis.layer_selection)
    family = patch.family_of(patch.denoiser_of(pipe)).name
    # the components the export holds (``pladis export --components`` may have written a subset)
    comps = {c.name: c for c in contracts.components(pipe, family) if c.name in m.components}
    for name, comp in comps.items():  # each component in the dtype it was exported in
        comp.module.to(device=device, dtype=getattr(torch, m.components[name].dtype))
    return comps
