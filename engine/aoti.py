"""AOTInductor engines: the PLADIS-patched denoiser through ``torch.export`` (``pladis::attention`` stays one
node) and ``torch._inductor.aoti_compile_and_package`` into a ``.pt2``; the other components as ONNX
Runtime engines. The build's shapes are dynamic, so the op stays a call (its fast path on a CPU, the
Triton kernel on a GPU); compilers trace into it only for static shapes (``ops.inductor_fusion``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from pladis.engine import ort
from pladis.errors import SettingError

log = logging.getLogger(__name__)


def device_info(device: str, precision: str) -> dict:
    info = {"kind": device, "torch": torch.__version__}
    if device != "cpu":
        if not torch.cuda.is_available():
            raise SettingError(
                "device", f"device {device!r} needs a CUDA GPU and a CUDA build of torch; use --device cpu"
            )
        info |= {"name": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability())}
    return info


def compile_package(comp, samples: list, dims: dict | None, path: Path) -> str:
    """``torch.export`` of the contract component ``comp`` on ``samples`` and AOTInductor into ``path``
    (a ``.pt2``); returns the package path. dims: the export's shape ranges, whose ranged axes become dynamic
    (torch.export works out how they relate: batch shared, etc.); None for static shapes."""
    from pladis.export import contracts

    dynamic = None
    if dims is not None:
        axes = contracts.dynamic_axes(comp, dims)
        dynamic = {"args": tuple({a: torch.export.Dim.AUTO for a in axes.get(i.name, {})} for i in comp.inputs)}
    with torch.no_grad():
        t0 = time.perf_counter()
        log.info(f"aoti: torch.export of {comp.name} ...")
        program = torch.export.export(contracts.Traced(comp).eval(), tuple(samples), dynamic_shapes=dynamic)
        log.info(f"aoti: compiling {comp.name} with AOTInductor (minutes on a CPU) ...")
        out = torch._inductor.aoti_compile_and_package(program, package_path=str(path))
        log.info(f"aoti: {comp.name} compiled in {time.perf_counter() - t0:.0f} s")
    return out


def build(src, dims, precision, cfg, folder: Path) -> dict:
    from pladis.eager import eager_components
    from pladis.export import contracts

    denoiser = src.denoiser
    comps = eager_components(str(src.folder.resolve()), cfg.device)
    comp = comps[denoiser]
    dtype = getattr(torch, src.component(denoiser).dtype)
    samples = [t.to(cfg.device) for t in contracts.sample_inputs(comp, dims, dtype)]
    path = compile_package(comp, samples, dims, folder / f"{denoiser}.pt2")
    out = {n: ort.build_component(src, n, "cpu" if cfg.device == "cpu" else cfg.device, cfg.opt_level, folder)
           for n in src.manifest.components if n != denoiser}  # fmt: skip
    out[denoiser] = {"file": Path(path).name, "kind": "aoti", "device": cfg.device, "dtype": str(dtype)}
    return out
