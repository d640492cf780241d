"""Validation of an exported component: checker, shape inference, then ONNX Runtime vs eager PyTorch.

Names are checked, then shapes, then values (Optimum's order); every output is compared and all failures
are reported together with the max-abs error, where it is, and the relative L2 error.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import torch

from pladis.errors import PladisError
from pladis.export import contracts

log = logging.getLogger(__name__)

# Relative L2 error allowed between ONNX Runtime and eager PyTorch, per precision. fp32: the target of the
# export contract (both sides compute in float32; only op order differs). fp16/bf16: both sides round every
# activation to the type's 11 resp. 8 significant bits but in different orders, so whole-model differences
# of a few units of that rounding are expected.
REL_L2_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


class ValidationError(PladisError):
    """An exported component does not match the eager model (names, shapes or values)."""


def check_graph(path: Path) -> str:
    """onnx.checker with full check (strict shape inference included), by path so external data works."""
    onnx.checker.check_model(str(path), full_check=True)
    return "full"


def ort_session(path: Path):
    from pladis import ort

    return ort.session(path, "cpu")


def compare(outputs: dict[str, np.ndarray], expected: dict[str, np.ndarray], tol: float) -> dict[str, dict]:
    """Per output: max_abs, where, rel_l2; raises ValidationError listing every failing output."""
    problems, report = [], {}
    if set(outputs) != set(expected):
        raise ValidationError(f"output names differ: ONNX {sorted(outputs)} vs eager {sorted(expected)}")
    for name, want in expected.items():
        got = outputs[name]
        if got.shape != want.shape:
            problems.append(f"{name}: shape {got.shape} vs eager {want.shape}")
            continue
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        where = tuple(int(i) for i in np.unravel_index(diff.argmax(), diff.shape)) if diff.size else ()
        rel = float(np.linalg.norm(diff) / max(np.linalg.norm(want.astype(np.float64)), 1e-30))
        report[name] = {"max_abs": float(diff.max()) if diff.size else 0.0, "at": list(where), "rel_l2": rel}
        if not np.isfinite(got).all() or rel > tol:
            problems.append(f"{name}: rel-L2 {rel:.3g} > {tol:g} (max-abs {report[name]['max_abs']:.3g} at {where})")
    if problems:
        raise ValidationError("; ".join(problems))
    return report


def component(path: Path, comp: contracts.Component, d: dict, dtype: torch.dtype, seed: int) -> dict:
    """Validate one exported file against ``comp`` run eagerly on the same sample inputs."""
    checker = check_graph(path)
    if dtype == torch.bfloat16:
        msg = "skipped: neither ONNX Runtime's CPU provider nor numpy has bfloat16; compare engines on a GPU"
        log.info(f"  {comp.name}: value check {msg}")
        return {"checker": checker, "values": msg}
    inputs = contracts.sample_inputs(comp, d, dtype, seed + 1)  # not the tracing inputs
    with torch.no_grad():
        eager = contracts.Traced(comp)(*inputs)
    expected = {o.name: _numpy(t) for o, t in zip(comp.outputs, eager, strict=True)}
    try:
        sess = ort_session(path)
    except Exception as err:  # noqa: BLE001 - ORT raises its own exception types; report them all the same way
        if dtype != torch.float32 and "NOT_IMPLEMENTED" in str(err):
            msg = f"skipped: ONNX Runtime's CPU provider lacks a {dtype} kernel ({str(err).splitlines()[0][:160]})"
            log.info(f"  {comp.name}: value check {msg}; validate on a GPU with onnxruntime-gpu")
            return {"checker": checker, "values": msg}
        raise
    names = [i.name for i in sess.get_inputs()]
    if names != [i.name for i in comp.inputs]:
        raise ValidationError(f"{comp.name}: input names {names} vs contract {[i.name for i in comp.inputs]}")
    got = sess.run(None, {i.name: _numpy(t) for i, t in zip(comp.inputs, inputs, strict=True)})
    outputs = {o.name: g for o, g in zip(sess.get_outputs(), got, strict=True)}
    try:
        report = compare(outputs, expected, REL_L2_TOL[dtype])
    except ValidationError as err:
        raise ValidationError(f"{comp.name} ({path.name}): {err}") from None
    worst = max(report.values(), key=lambda r: r["rel_l2"])
    log.info(
        f"  {comp.name}: ONNX Runtime vs eager: worst rel-L2 {worst['rel_l2']:.2e}, max-abs {worst['max_abs']:.2e}"
    )
    return {"checker": checker, "values": "ok", "tolerance_rel_l2": REL_L2_TOL[dtype], "outputs": report}


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()
