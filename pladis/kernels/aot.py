"""Ahead-of-time compilation of ``pladis_fwd`` for a given GPU architecture: what the TensorRT plugin embeds.

``compile_kernel(cfg, capability)`` runs ``triton.compile`` with an explicit ``GPUTarget``, so it needs no GPU
(CI compiles sm_80-sm_90 on a CPU), and returns the entry name, the PTX, the cubin and the metadata the
launch needs. Compiled kernels are memoised per (config, capability). The PTX ISA version is pinned to
``PTX_VERSION`` so that the driver an engine needs does not depend on the ptxas Triton ships with.
"""

from __future__ import annotations

import dataclasses
import functools
import re

from pladis.kernels import PTX_VERSION, check_triton
from pladis.kernels.attention import EXTRA_ARGS, SHARED_MEMORY_LIMIT, KernelConfig

INPUTS = ("Q", "K", "V", "M", "LAM")
OUTPUTS = ("OUT",)


@dataclasses.dataclass(frozen=True)
class CompiledKernel:
    """One compiled ``pladis_fwd``: what a launcher (TensorRT, the CUDA driver) needs."""

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


def signature(cfg: KernelConfig) -> dict[str, str]:
    """Triton's signature of the runtime arguments in kernel order: pointers, int32 sizes, output pointer."""
    t = "*" + cfg.dtype  # KernelConfig's type names are Triton's ("fp32", "fp16", "bf16")
    return {"Q": t, "K": t, "V": t, "M": "*" + cfg.mask_dtype, "LAM": "*fp32",
            **dict.fromkeys(EXTRA_ARGS, "i32"), "OUT": t}  # fmt: skip


@functools.cache
def compile_kernel(cfg: KernelConfig, capability: int) -> CompiledKernel:
    """Compile for compute capability ``capability`` (e.g. 90) without touching a GPU; refuse a kernel that
    needs a launch feature TensorRT's AOT launch does not provide (scratch memory, clusters, PDL, TMA)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pladis.kernels.attention import pladis_fwd

    check_triton()
    constexprs = cfg.constexprs()
    src = ASTSource(pladis_fwd, {**signature(cfg), **dict.fromkeys(constexprs, "constexpr")}, constexprs=constexprs)
    # enable_fp_fusion stated, not left to the default (Triton 3.10 changes it): multiply-adds contract to FMA
    options = {"num_warps": cfg.num_warps, "num_stages": 1, "num_ctas": 1, "ptx_version": PTX_VERSION,
               "enable_fp_fusion": True}  # fmt: skip
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
        raise RuntimeError(f"pladis_fwd for {cfg} on sm_{capability} needs {found}, which TensorRT cannot launch")
    return kernel


def ptx_isa_version(ptx: str) -> tuple[int, int]:
    """The ``.version X.Y`` of a PTX module."""
    m = re.search(r"^\s*\.version\s+(\d+)\.(\d+)", ptx, re.MULTILINE)
    if m is None:
        raise ValueError("no .version directive in the PTX")
    return int(m.group(1)), int(m.group(2))


def ptx_target(ptx: str) -> str:
    """The ``.target`` of a PTX module (e.g. ``sm_90a``)."""
    m = re.search(r"^\s*\.target\s+(\w+)", ptx, re.MULTILINE)
    if m is None:
        raise ValueError("no .target directive in the PTX")
    return m.group(1)


def ptx_entry_params(ptx: str, name: str) -> list[str]:
    """The PTX types of the entry ``name``'s parameters, in order (``u64`` for pointers, ``u32`` for int32)."""
    m = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, re.DOTALL)
    if m is None:
        raise ValueError(f"no .entry {name} in the PTX")
    return re.findall(r"\.param\s+\.(\w+)", m.group(1))


def expected_params(ptx_params: list[str]) -> tuple[list[str], int]:
    """The launch contract's parameter types (inputs, int32 sizes, output) and how many hidden trailing
    pointers the PTX has beyond them (Triton >= 3.3: global scratch, then profile scratch)."""
    contract = ["u64"] * len(INPUTS) + ["u32"] * len(EXTRA_ARGS) + ["u64"] * len(OUTPUTS)
    return contract, len(ptx_params) - len(contract)
