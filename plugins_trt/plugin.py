"""The ``PladisAttention`` TensorRT plugin as plain functions: nothing here imports TensorRT (or Triton) at import
time, so the engine builder can check nodes against ``ATTRIBUTES`` / ``check_attributes`` on any machine.

``pladis.plugins_trt.register()`` imports ``tensorrt.plugin`` (``trtp``), resolves the annotations below
(written as TensorRT expects them, evaluated only then) and applies ``trtp.register`` / ``trtp.autotune`` /
``trtp.aot_impl``. The plugin is AOT only: ``aot_impl`` returns the PTX of ``pladis_fwd`` compiled for the
build GPU, so the engine runs without Python (``trtexec --loadEngine``, the C++ runtime). A node with
``text_len == 0`` (cross attention) gets ``pladis_fwd`` (pladis/kernels/attention.py), one with ``text_len > 0``
(joint MMDiT attention: SD3, FLUX) ``pladis_joint_fwd`` (pladis/kernels/joint.py) with ``text_first`` from the
node; both take (inputs, int32 sizes, output), so the launch is built the same way.

TensorRT's rules, which tests/test_plugins_trt.py checks on these functions: tensor descriptors first, then
every attribute, annotated, in ``ATTRIBUTES`` order, no defaults; no attribute named ``outputs``,
``stream`` or ``tactic``; ``autotune`` ends with ``outputs``, ``aot_impl`` with ``outputs, tactic`` and
carries the 4-tuple return annotation. TensorRT calls ``aot_impl`` with every registered attribute, by
position, so each function declares all of them.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from pladis.errors import SettingError

if TYPE_CHECKING:  # only for readers and type checkers; register() supplies the real module
    import tensorrt.plugin as trtp

    from pladis.kernels import aot, joint
    from pladis.kernels import attention as kernel

NAMESPACE = "pladis"
NAME = "PladisAttention"
PLUGIN_ID = f"{NAMESPACE}::{NAME}"  # the ONNX node's op_type and plugin_namespace attribute
INPUTS = ("q", "k", "v", "mask", "lam")
# The node's attributes the plugin reads, in register order, with the types the ONNX parser delivers them
# as (FLOAT, INT). plugin_version / plugin_namespace are for the parser, not the plugin.
ATTRIBUTES = {"alpha": float, "scale": float, "text_len": int, "text_first": int}
RESERVED = ("outputs", "stream", "tactic")
# q, k, v and the output share one type; the mask's type is independent; lam is float32
IO_TYPES = "{t}, {t}, {t}, {m}, FP32, {t}"
# The longest text block the joint kernel holds in one tile (pladis.kernels.joint.MAX_TEXT; tests check they
# agree): stated here so that the engine builder checks nodes without importing Triton.
MAX_TEXT = 512
OTHER_BACKENDS = "build this model with --backend ort or --backend aoti"


def check_attributes(alpha: float, text_len: int, text_first: int = 0) -> None:
    """Refuse (SettingError naming the attribute and the fix) a node the plugin's kernels do not implement:
    alpha other than 1.5 and 2 (the bisection alphas), joint attention with more than ``MAX_TEXT`` text tokens."""
    if alpha not in (1.5, 2.0):
        raise SettingError(
            "alpha", f"the TensorRT plugin's kernels are exact for alpha 1.5 and 2 only; got alpha={alpha}: "
            f"{OTHER_BACKENDS}, or export with --alpha 1.5 or 2"
        )  # fmt: skip
    if not 0 <= text_len <= MAX_TEXT:
        raise SettingError(
            "text_len", f"PladisAttention node with text_len={text_len}: the TensorRT plugin's joint kernel holds "
            f"at most {MAX_TEXT} text tokens in one tile; {OTHER_BACKENDS}, or export with a shorter text length"
        )  # fmt: skip
    if text_first not in (0, 1):
        raise SettingError("text_first", f"text_first must be 0 or 1; got {text_first}: re-export with pladis")


def io_types(bf16: bool) -> str:
    """The AutoTuneCombination type string: fp32/fp16(/bf16) q, k, v, out alike, any float mask, fp32 lam."""
    types = ["FP32", "FP16", *(["BF16"] if bf16 else [])]
    return IO_TYPES.format(t="|".join(types), m="*".join(types))


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """What the plugin needs of one input: its type ("fp32"...), its dims where fixed (None where they vary
    with the optimisation profile) and their upper bounds."""

    dtype: str
    static: tuple
    upper: tuple


def plan(
    q: TensorInfo, k: TensorInfo, v: TensorInfo, mask: TensorInfo, alpha: float, scale: float, capability: int,
    text_len: int = 0, text_first: int = 0,
) -> tuple[kernel.KernelConfig | joint.JointConfig, aot.CompiledKernel]:  # fmt: skip
    """The kernel for one plugin instance, compiled (memoised) for ``capability``: cross attention
    (``text_len == 0``) with tiles from the profile's longest key row, or joint attention with the text tile
    from ``text_len``; the mask specialisation from the mask's fixed dims. Raises a PladisError
    (``KernelUnsupported``, ``SettingError``) naming the limit and the fix."""
    from pladis.kernels import aot, joint
    from pladis.kernels import attention as kernel

    check_attributes(alpha, text_len, text_first)
    if len(q.static) != 4 or len(k.static) != 4 or len(v.static) != 4:
        raise SettingError("q", "PladisAttention's q, k, v must have rank 4 (B, H, L, D); re-export with pladis")
    mode = kernel.mask_mode(mask.static)
    try:
        if text_len:
            cfg = joint.joint_config(q.dtype, mask.dtype, q.upper[3], v.upper[3], text_len, alpha, scale, mode,
                                     bool(text_first))  # fmt: skip
        else:
            cfg = kernel.kernel_config(q.dtype, mask.dtype, q.upper[3], v.upper[3], k.upper[2], alpha, scale, mode)
    except kernel.KernelUnsupported as e:
        raise kernel.KernelUnsupported(f"TensorRT plugin: {e}; {OTHER_BACKENDS}") from None
    return cfg, aot.compile_kernel(cfg, capability)


def launch_and_args(cfg, compiled, q_shape, k_shape, v_shape, mask_shape, lam_shape, *, text_len: int = 0, cdiv=None,
                    minimum=None):  # fmt: skip
    """Launch parameters and int32 extra arguments for shapes of ints or TensorRT shape expressions (pass
    ``cdiv=trtp.cdiv, minimum=trtp.min`` for expressions). The same arithmetic the PyTorch launchers use:
    ``attention.extra_args`` for cross attention, ``joint.joint_extra_args`` (the node's ``text_len``, an int)
    for a joint node; the grid is the same function of (B, H, Lq) for both."""
    from pladis.kernels import attention as kernel

    ops = {name: f for name, f in (("cdiv", cdiv), ("minimum", minimum)) if f is not None}
    params = kernel.launch(q_shape[0], q_shape[1], q_shape[2], block_m=cfg.block_m, num_warps=compiled.num_warps,
                           shared_mem=compiled.shared_mem, **ops)  # fmt: skip
    if text_len:
        from pladis.kernels.joint import joint_extra_args

        return params, joint_extra_args(q_shape, v_shape, text_len, mask_shape, lam_shape)
    return params, kernel.extra_args(q_shape, k_shape, v_shape, mask_shape, lam_shape)


def gpu_capability() -> int:
    """The build GPU's compute capability as an int (90 for 9.0): the kernel is compiled for it."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


# --------------------------------------------------------------------------------------------------
# The functions TensorRT calls (decorated by register())
# --------------------------------------------------------------------------------------------------


def register_fn(
    q: trtp.TensorDesc,
    k: trtp.TensorDesc,
    v: trtp.TensorDesc,
    mask: trtp.TensorDesc,
    lam: trtp.TensorDesc,
    alpha: float,
    scale: float,
    text_len: int,
    text_first: int,
) -> trtp.TensorDesc:
    """The output: q's shape with v's last dim, in q's type."""
    import tensorrt.plugin as trtp

    check_attributes(alpha, text_len, text_first)
    return trtp.from_shape_expr((q.shape_expr[0], q.shape_expr[1], q.shape_expr[2], v.shape_expr[3]), dtype=q.dtype)


def autotune_fn(
    q: trtp.TensorDesc,
    k: trtp.TensorDesc,
    v: trtp.TensorDesc,
    mask: trtp.TensorDesc,
    lam: trtp.TensorDesc,
    alpha: float,
    scale: float,
    text_len: int,
    text_first: int,
    outputs: tuple[trtp.TensorDesc],
) -> list[trtp.AutoTuneCombination]:
    """The type combinations the kernel compiles for (linear layouts, one tactic)."""
    import tensorrt.plugin as trtp

    return [trtp.AutoTuneCombination(io_types(bf16=gpu_capability() >= 80), "LINEAR")]


def aot_impl_fn(
    q: trtp.TensorDesc,
    k: trtp.TensorDesc,
    v: trtp.TensorDesc,
    mask: trtp.TensorDesc,
    lam: trtp.TensorDesc,
    alpha: float,
    scale: float,
    text_len: int,
    text_first: int,
    outputs: tuple[trtp.TensorDesc],
    tactic: int,
) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
    """Kernel name, PTX, launch parameters and int32 extra arguments (symbolic in the dynamic dims): the cross
    kernel for ``text_len == 0``, the joint kernel (text first or last per ``text_first``) otherwise."""
    import tensorrt as trt
    import tensorrt.plugin as trtp

    names = {trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16"}

    def info(desc: trtp.TensorDesc) -> TensorInfo:
        if desc.dtype not in names:
            raise SettingError("precision", f"PladisAttention takes fp32, fp16 or bf16 tensors; got {desc.dtype}: "
                               "export with --precision fp32, fp16 or bf16")  # fmt: skip
        shape = desc.shape  # concrete dims, -1 where the optimisation profile lets them vary
        upper = tuple(shape.max) if shape.is_dynamic else tuple(shape)
        return TensorInfo(names[desc.dtype], tuple(d if d >= 0 else None for d in shape), upper)

    cfg, compiled = plan(info(q), info(k), info(v), info(mask), alpha, scale, gpu_capability(), text_len, text_first)
    launch, extra = launch_and_args(cfg, compiled, q.shape_expr, k.shape_expr, v.shape_expr, mask.shape_expr,
                                    lam.shape_expr, text_len=text_len, cdiv=trtp.cdiv, minimum=trtp.min)  # fmt: skip
    params = trtp.KernelLaunchParams()
    params.grid_x, params.grid_y, params.grid_z = launch.grid
    params.block_x, params.block_y, params.block_z = launch.block
    params.shared_mem = launch.shared_mem
    extra_args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in extra])
    return compiled.name, compiled.ptx, params, extra_args


FUNCTIONS = {"register": register_fn, "autotune": autotune_fn, "aot_impl": aot_impl_fn}
