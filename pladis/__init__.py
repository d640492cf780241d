"""pladis: PLADIS-enhanced diffusion models, from eager PyTorch to deployed engines.

The core is three modules: ``pladis.ops`` (the operator and its custom op), ``pladis.patch`` (diffusers
processors, ``apply``/``remove``) and ``pladis.models`` (built-in random-weight models, ``load``).
Importing ``pladis`` loads torch only; diffusers, ONNX and TensorRT load when a stage needs them.
"""

from pladis.ops import attention, entmax, joint_attention
from pladis.patch import PatchReport, apply, remove, supported_models

__all__ = ["PatchReport", "apply", "attention", "entmax", "joint_attention", "remove", "supported_models"]
__version__ = "0.1.0"
