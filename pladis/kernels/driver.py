"""Launch a PTX entry through the CUDA driver API (``libcuda`` via ctypes), the way TensorRT launches an AOT
plugin kernel: ``cuModuleLoadData`` on the PTX text (the driver JIT-compiles it), ``cuModuleGetFunction`` on the
entry name, ``cuLaunchKernel`` with one pointer per parameter. Used on a GPU to run exactly what ``aot_impl``
returns without TensorRT (tests/test_kernels.py, ``make gpu-check``); needs an NVIDIA driver, nothing else.
"""

from __future__ import annotations

import ctypes


class CudaError(RuntimeError):
    pass


class Driver:
    """The few driver calls needed; uses the context current on this thread (PyTorch's primary context once
    a CUDA tensor exists)."""

    def __init__(self):
        self.lib = ctypes.CDLL("libcuda.so.1")
        self.lib.cuLaunchKernel.argtypes = [ctypes.c_void_p, *[ctypes.c_uint] * 7, ctypes.c_void_p,
                                            ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]  # fmt: skip
        self._check(self.lib.cuInit(0), "cuInit")
        self._modules = []

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            msg = ctypes.c_char_p()
            self.lib.cuGetErrorString(status, ctypes.byref(msg))
            raise CudaError(f"{what} failed: CUDA error {status} ({(msg.value or b'?').decode()})")

    def load(self, ptx: str, name: str) -> ctypes.c_void_p:
        """The function ``name`` of a PTX module (JIT-compiled by the driver for this GPU)."""
        module, fn = ctypes.c_void_p(), ctypes.c_void_p()
        self._check(self.lib.cuModuleLoadData(ctypes.byref(module), ctypes.c_char_p(ptx.encode() + b"\0")),
                    "cuModuleLoadData (is the driver too old for the PTX ISA version?)")  # fmt: skip
        self._modules.append(module)
        self._check(self.lib.cuModuleGetFunction(ctypes.byref(fn), module, name.encode()), "cuModuleGetFunction")
        return fn

    def launch(self, fn, grid, block, shared_mem: int, stream: int, params: list[tuple[str, int]]) -> None:
        """params: ("ptr", address) or ("i32", value) per kernel parameter, in order."""
        holders = [ctypes.c_uint64(v) if kind == "ptr" else ctypes.c_int32(v) for kind, v in params]
        argv = (ctypes.c_void_p * len(holders))(*[ctypes.cast(ctypes.pointer(h), ctypes.c_void_p) for h in holders])
        self._check(self.lib.cuLaunchKernel(fn, *grid, *block, shared_mem, ctypes.c_void_p(stream), argv, None),
                    "cuLaunchKernel")  # fmt: skip
