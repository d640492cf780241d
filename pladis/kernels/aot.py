"""Ahead-of-time compilation of the plugin's kernels for a given GPU architecture: what the TensorRT plugin embeds.

``compile_kernel(cfg, capability)`` compiles ``pladis_fwd`` (cross attention, a ``KernelConfig``) or
``pladis_joint_fwd`` (joint attention, a ``JointConfig``) with ``triton.compile`` and an explicit ``GPUTarget``,
so it needs no GPU (CI compiles every target in ``TARGETS`` on a CPU), and returns the entry name, the PTX, the
cubin and the metadata the launch needs. Compiled kernels are memoised per (config, capability). The PTX ISA
version is pinned (``ptx_version``) so that the driver an engine needs does not depend on the ptxas Triton
ships with.
"""

from __future__ import annotations

import dataclasses
import functools
import re

from pladis.kernels import PTX_VERSION, check_triton
from pladis.kernels.attention import EXTRA_ARGS, SHARED_MEMORY_LIMIT, KernelConfig, KernelUnsupported

INPUTS = ("Q", "K", "V", "M", "LAM")
OUTPUTS = ("OUT",)
# The compute capabilities the plugin's kernels are compiled and checked for (tests/test_kernels.py, on a CPU):
# Ampere (80, 86), Ada (89), Hopper (90), Blackwell data centre (100) and consumer (120).
TARGETS = (80, 86, 89, 90, 100, 120)
# The first PTX ISA that knows an architecture newer than PTX_VERSION's (8.6: CUDA 12.7, 8.7: CUDA 12.8):
# those targets' PTX is written in that ISA, hence needs that driver.
MIN_PTX_VERSION = {100: 86, 120: 87}


class LaunchUnsupported(KernelUnsupported):
    """The compiled kernel needs something TensorRT's ahead-of-time launch does not provide."""


@dataclasses.dataclass(frozen=True)
class CompiledKernel:
    """One compiled kernel (``pladis_fwd`` or ``pladis_joint_fwd``): what a launcher (TensorRT, the CUDA driver)
    needs."""

    name: str
    ptx: str
    cubin: bytes
    num_warps: int
    shared_mem: int  # dynamic shared memory bytes the launch must pass
    global_scratch_size: int  # bytes of the hidden global scratch buffer (must be 0: TensorRT passes null)
    profile_scratch_size: int
    capability: int

    @property
    def ptx_version(self) -> tuple[int, int]:
        return ptx_isa_version(self.ptx)


def ptx_version(capability: int) -> int:
    """The PTX ISA (as 80 for 8.0) the kernel for ``capability`` is written in: ``PTX_VERSION``, or the first ISA
    that knows the architecture."""
    return max(PTX_VERSION, MIN_PTX_VERSION.get(capability, PTX_VERSION))


def is_joint(cfg) -> bool:
    """Whether ``cfg`` is a joint-attention kernel's config (``joint.JointConfig``)."""
    return hasattr(cfg, "block_t")


def extra_arg_names(cfg) -> tuple[str, ...]:
    """The int32 size parameters of ``cfg``'s kernel, in kernel order."""
    if is_joint(cfg):
        from pladis.kernels.joint import JOINT_EXTRA_ARGS

        return JOINT_EXTRA_ARGS
    return EXTRA_ARGS


def jit_function(cfg):
    """The Triton function ``cfg`` configures."""
    if is_joint(cfg):
        from pladis.kernels.joint import pladis_joint_fwd

        return pladis_joint_fwd
    from pladis.kernels.attention import pladis_fwd

    return pladis_fwd


def signature(cfg: KernelConfig) -> dict[str, str]:
    """Triton's signature of the runtime arguments in kernel order: pointers, int32 sizes, output pointer."""
    t = "*" + cfg.dtype  # the configs' type names are Triton's ("fp32", "fp16", "bf16")
    return {"Q": t, "K": t, "V": t, "M": "*" + cfg.mask_dtype, "LAM": "*fp32",
            **dict.fromkeys(extra_arg_names(cfg), "i32"), "OUT": t}  # fmt: skip


@functools.cache
def compile_kernel(cfg, capability: int) -> CompiledKernel:
    """Compile ``cfg`` (a ``KernelConfig`` or ``joint.JointConfig``) for compute capability ``capability`` (e.g.
    90) without touching a GPU; refuse (``LaunchUnsupported``) a kernel that needs a launch feature TensorRT's AOT
    launch does not provide (scratch memory, clusters, PDL, TMA, tensor memory, over 48 KiB shared memory)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    check_triton()
    constexprs = cfg.constexprs()
    fn = jit_function(cfg)
    src = ASTSource(fn, {**signature(cfg), **dict.fromkeys(constexprs, "constexpr")}, constexprs=constexprs)
    # enable_fp_fusion stated, not left to the default (Triton 3.10 changes it): multiply-adds contract to FMA
    options = {"num_warps": cfg.num_warps, "num_stages": 1, "num_ctas": 1, "ptx_version": ptx_version(capability),
               "enable_fp_fusion": True}  # fmt: skip
    if getattr(cfg, "max_registers", None) is not None:  # a register cap (key-tiled sweep variants only)
        options["maxnreg"] = cfg.max_registers
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
    md = compiled.metadata
    kernel = CompiledKernel(
        name=md.name, ptx=compiled.asm["ptx"], cubin=compiled.asm["cubin"], num_warps=md.num_warps,
        shared_mem=md.shared, global_scratch_size=md.global_scratch_size,
        profile_scratch_size=md.profile_scratch_size, capability=capability,
    )  # fmt: skip
    unsupported = {
        "global scratch": md.global_scratch_size, "profile scratch": md.profile_scratch_size,
        "num_ctas > 1": md.num_ctas != 1, "cooperative launch": getattr(md, "launch_cooperative_grid", False),
        "programmatic dependent launch": getattr(md, "launch_pdl", False),
        "tensor memory": getattr(md, "tmem_size", 0), "TMA descriptors": bool(getattr(md, "tensordesc_meta", None)),
        f"shared memory over {SHARED_MEMORY_LIMIT} bytes": md.shared > SHARED_MEMORY_LIMIT,
    }  # fmt: skip
    if any(unsupported.values()):
        found = ", ".join(k for k, v in unsupported.items() if v)
        raise LaunchUnsupported(
            f"{fn.__name__} for {cfg} on sm_{capability} needs {found}, which TensorRT's ahead-of-time plugin launch "
            "does not provide; build this model with --backend ort or --backend aoti"
        )
    return kernel


def ptx_isa_version(ptx: str) -> tuple[int, int]:
    """The ``.version X.Y`` of a PTX module (RuntimeError when there is none: not PTX)."""
    m = re.search(r"^\s*\.version\s+(\d+)\.(\d+)", ptx, re.MULTILINE)
    if m is None:
        raise RuntimeError("no .version directive in the PTX")
    return int(m.group(1)), int(m.group(2))


def ptx_target(ptx: str) -> str:
    """The ``.target`` of a PTX module (e.g. ``sm_90a``)."""
    m = re.search(r"^\s*\.target\s+(\w+)", ptx, re.MULTILINE)
    if m is None:
        raise RuntimeError("no .target directive in the PTX")
    return m.group(1)


def ptx_entry_params(ptx: str, name: str) -> list[str]:
    """The PTX types of the entry ``name``'s parameters, in order (``u64`` for pointers, ``u32`` for int32)."""
    m = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, re.DOTALL)
    if m is None:
        raise RuntimeError(f"no .entry {name} in the PTX")
    return re.findall(r"\.param\s+\.(\w+)", m.group(1))


def expected_params(ptx_params: list[str], extra_args: tuple[str, ...] = EXTRA_ARGS) -> tuple[list[str], int]:
    """The launch contract's parameter types (inputs, int32 sizes ``extra_args``, output) and how many hidden
    trailing pointers the PTX has beyond them (Triton >= 3.3: global scratch, then profile scratch)."""
    contract = ["u64"] * len(INPUTS) + ["u32"] * len(extra_args) + ["u64"] * len(OUTPUTS)
    return contract, len(ptx_params) - len(contract)
