"""Parity: an engine against eager PyTorch, step by step through the whole scheduler loop.

Both sides start from identical initial latents and run the same diffusers scheduler twice:
- teacher-forced: at every step both predict from the *reference* latent, so errors do not compound and
  each step's error is the engine's own;
- free-running: each side follows its own trajectory, as a user's run would.
Per step: relative L2, cosine similarity and max-abs of the noise prediction and of the next latent;
at the end the PSNR between the two free-running images. The verdict is on the teacher-forced steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pladis.files import atomic_path, sha256, write_text
from pladis.options import DEFAULT_PROMPT
from pladis.runtime.pipeline import Runtime, step_generators
from pladis.runtime.request import PARITY_STEPS, Request

# Teacher-forced per-step tolerance on relative L2 (noise prediction and latent), by engine precision.
# fp32: the export contract (both sides compute in float32; only operation order differs); measured
#       2e-6 to 4e-6 on the tiny models.
# fp16: both sides round activations to 11 significant bits, in different orders; measured up to 8.3e-3
#       (tiny-flux, 3 steps; tiny-sd15 4.7e-3, tiny-pixart 3.1e-3), so 3e-2 leaves a 3.6x margin while a
#       wrong graph still shows errors of order 1.
# bf16: 8 significant bits, 8x fp16's; provisional: ONNX Runtime's CPU provider cannot run bf16, so it
#       is to be measured on a GPU.
TOLERANCE = {"fp32": 1e-4, "fp16": 3e-2, "bf16": 0.25}


def compare(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """rel_l2 = ||a - b|| / ||b||, cosine similarity, max_abs (b is the reference)."""
    a, b = a.double().flatten(), b.double().flatten()
    return {
        "rel_l2": float((a - b).norm() / b.norm().clamp_min(1e-30)),
        "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
        "max_abs": float((a - b).abs().max()),
    }


def psnr(a, b) -> float:
    """PSNR in dB between two uint8 images (inf when identical)."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


@dataclass
class ParityReport:
    engine: str
    backend: str
    precision: str
    scheduler: str
    tolerance: float
    lam: list[float] | None = None  # the PLADIS strength both sides ran at, per prompt (None: no PLADIS)
    teacher_forced: list[dict] = field(default_factory=list)
    free_running: list[dict] = field(default_factory=list)
    image_psnr_db: float = 0.0

    @property
    def failures(self) -> list[str]:
        """Teacher-forced steps whose noise or latent rel-L2 is past the tolerance (or not finite)."""
        out = []
        for row in self.teacher_forced:
            for what in ("noise", "latent"):
                rel = row[what]["rel_l2"]
                if not rel <= self.tolerance:
                    out.append(f"step {row['step']} (t={row['t']:g}): {what} rel-L2 {rel:.3g} > {self.tolerance:g}")
        return out

    @property
    def ok(self) -> bool:
        return not self.failures

    def table(self) -> str:
        lam = "" if self.lam is None else f", lam {'/'.join(f'{x:g}' for x in self.lam)}"
        head = (f"Parity: {self.backend} engine vs eager PyTorch ({self.precision}, {self.scheduler}{lam}); "
                f"tolerance rel-L2 {self.tolerance:g} per teacher-forced step")  # fmt: skip
        rows = ["| step | t | TF noise rel-L2 | TF latent rel-L2 | TF cosine | FR latent rel-L2 | FR max-abs |",
                "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for tf, fr in zip(self.teacher_forced, self.free_running, strict=True):
            cells = [tf["step"], f"{tf['t']:g}", f"{tf['noise']['rel_l2']:.2e}", f"{tf['latent']['rel_l2']:.2e}",
                     f"{tf['noise']['cosine']:.6f}", f"{fr['latent']['rel_l2']:.2e}",
                     f"{fr['latent']['max_abs']:.2e}"]  # fmt: skip
            rows.append("| " + " | ".join(str(c) for c in cells) + " |")
        verdict = "PASS" if self.ok else "FAIL: " + "; ".join(self.failures)
        return "\n".join(
            [head, "", *rows, "", f"Final image PSNR (free-running): {self.image_psnr_db:.1f} dB. {verdict}"]
        )

    def to_json(self) -> str:
        return json.dumps({**self.__dict__, "ok": self.ok, "failures": self.failures}, indent=2) + "\n"


def check(engine: str | Path, backend: str | None = None, request: Request | None = None, *, device: str = "cpu",
          verify: bool = True, loras=None, cuda_graphs=False, **fields) -> ParityReport:  # fmt: skip
    """Compare ``backend`` on ``engine`` with eager PyTorch through the request's steps, both ways (backend
    None: each component as built, or ONNX Runtime for an export folder). ``request``, or ``Request``
    keywords (default prompt ``DEFAULT_PROMPT``, ``PARITY_STEPS`` steps); its lam (a number or one per
    prompt; None: the export's default) is the strength both sides run at. ``loras``: LoRAs swapped onto the
    engine (``Runtime(loras=)``; None: those ``pladis lora`` attached to the folder); the eager reference is
    rebuilt with the same adapters loaded and fused by diffusers on the real pipeline. ``cuda_graphs``
    (``Runtime``'s): the engine side replays its denoiser from CUDA graphs; the eager reference never does."""
    if request is None:
        request = Request(**{"prompt": DEFAULT_PROMPT, "steps": PARITY_STEPS, **fields})
    elif fields:
        raise TypeError(f"pass a Request or keyword settings, not both (got {', '.join(fields)})")
    eng = Runtime(engine, backend=backend, device=device, verify=verify, loras=loras, cuda_graphs=cuda_graphs)
    ref = Runtime(eng.engine, backend="torch", device=device, loras=())
    ref.eager_loras = tuple((str(x.path), x.scale, sha256(x.path)) for x in eng.loras)
    s = eng.settings(request)
    precision = eng.engine.precision
    cond_r, sched_r, lat_r = ref.prepare(s)
    cond_e, sched_e, lat_e = eng.prepare(s)
    label = "+".join(sorted(set(eng.backend_names.values())))
    report = ParityReport(
        str(engine),
        label,
        precision,
        type(sched_r).__name__,
        TOLERANCE[precision],
        None if s.lam is None else list(s.lam),
    )
    tf_scheds = [rt.scheduler(s.scheduler) for rt in (ref, eng)]  # fresh copies for the teacher-forced walk
    for sched in tf_scheds:
        ref.family.timesteps(ref.denoising, sched, s.steps, s.height, s.width)
    report.teacher_forced, _, _ = _walk(ref, eng, s, (cond_r, cond_e), tf_scheds, lat_r, lat_e, teacher_forced=True)
    report.free_running, lat_r, lat_e = _walk(ref, eng, s, (cond_r, cond_e), (sched_r, sched_e), lat_r, lat_e,
                                              teacher_forced=False)  # fmt: skip
    report.image_psnr_db = psnr(eng.decode(lat_e, s)[0], ref.decode(lat_r, s)[0])
    return report


def _walk(ref: Runtime, eng: Runtime, s, conds, scheds, lat_r, lat_e, teacher_forced: bool):
    """Run both sides through the steps; teacher-forced, the engine starts every step from the reference
    latent. Each side has its own scheduler and an identically seeded generator (ancestral samplers)."""
    gens = [step_generators(s), step_generators(s)]
    rows = []
    for i, t in enumerate(scheds[0].timesteps):
        src_e = lat_r if teacher_forced else lat_e
        n_r = ref.predict(lat_r, t, conds[0], scheds[0], s)
        n_e = eng.predict(src_e, t, conds[1], scheds[1], s)
        lat_r = scheds[0].step(n_r, t, lat_r, generator=gens[0]).prev_sample
        lat_e = scheds[1].step(n_e, t, src_e, generator=gens[1]).prev_sample
        rows.append({"step": i, "t": float(t), "noise": compare(n_e, n_r), "latent": compare(lat_e, lat_r)})
    return rows, lat_r, lat_e


def plot(report: ParityReport, path: str | Path) -> Path:
    """Error per step (log scale): teacher-forced and free-running, noise and latent, with the tolerance."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for rows, style, label in (
        (report.teacher_forced, "-o", "teacher-forced"),
        (report.free_running, "--s", "free-running"),
    ):
        steps = [r["step"] for r in rows]
        for what in ("noise", "latent"):
            ax.semilogy(steps, [max(r[what]["rel_l2"], 1e-12) for r in rows], style, label=f"{label} {what}")
    ax.axhline(report.tolerance, color="black", linestyle=":", linewidth=1, label=f"tolerance {report.tolerance:g}")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("relative L2 vs eager PyTorch")
    ax.set_title(f"{report.backend} engine parity ({report.precision}, {report.scheduler})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def save(report: ParityReport, json_path: str | Path | None = None, plot_path: str | Path | None = None) -> None:
    if json_path:
        write_text(json_path, report.to_json())
    if plot_path:
        plot(report, plot_path)
