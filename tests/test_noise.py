"""Ancestral step noise drawn before the loop (pladis.runtime.noise) vs diffusers drawing it in every step.

Reference: the plain diffusers loop, ``sched.step(..., generator=[one CPU generator per image])``, which is what
the runtime did before and still does with ``draw_ahead`` off. Bitwise on the CPU: the same generators make the
same ``torch.randn`` calls, only earlier.
"""

import diffusers
import pytest
import torch

from pladis.errors import PladisError
from pladis.runtime import noise

SHAPE = (2, 4, 8, 8)  # two images


def model(latents, t):
    """A stand-in denoiser output that depends on the sample and the timestep."""
    return torch.tanh(latents * 0.3 + float(t) / 1000)


def loop(name: str, seeds, ahead: bool, steps: int = 6, device: str = "cpu", no_sync: bool = False):
    """A diffusers scheduler loop over ``model``; ``no_sync``: the steps (not the set-up before them) under
    torch's CUDA sync debug mode "error", which raises on any host-device sync."""
    sched = getattr(diffusers, name)()
    sched.set_timesteps(steps)
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(99)).to(device) * sched.init_noise_sigma
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    drawn = noise.for_loop(sched, gens, latents, device) if ahead else None
    previous = torch.cuda.get_sync_debug_mode() if no_sync else None
    try:
        if no_sync:
            torch.cuda.set_sync_debug_mode("error")
        for t in sched.timesteps:
            out = model(sched.scale_model_input(latents, t), t)
            if drawn is None:
                latents = sched.step(out, t, latents, generator=gens).prev_sample
            else:
                with drawn.step():
                    latents = sched.step(out, t, latents, generator=gens).prev_sample
    finally:
        if no_sync:
            torch.cuda.set_sync_debug_mode(previous)
    return latents, drawn


@pytest.mark.parametrize("name", sorted(noise.DRAWS_PER_STEP))
def test_drawn_ahead_equals_diffusers_drawing_each_step(name):
    want, _ = loop(name, [1, 2], ahead=False)
    got, drawn = loop(name, [1, 2], ahead=True)
    assert torch.equal(got, want)  # atol=0: the same randn calls on the same generators, only earlier
    used = 6 if name == "EulerAncestralDiscreteScheduler" else 5  # LCM draws no noise in its last step
    assert drawn.taken == [used, used]  # every draw diffusers made came from the table
    other, _ = loop(name, [1, 3], ahead=True)
    assert not torch.equal(other[1], want[1]) and torch.equal(other[0], want[0])  # each image its own generator


def test_schedulers_that_draw_nothing_get_no_table():
    sched = diffusers.EulerDiscreteScheduler()
    sched.set_timesteps(4)
    assert noise.for_loop(sched, [torch.Generator()], torch.zeros(SHAPE), "cpu") is None


def test_a_draw_it_did_not_make_is_refused():
    g = torch.Generator().manual_seed(0)
    drawn = noise.StepNoise([g], (4, 8, 8), steps=1, dtype=torch.float32, device="cpu")
    with drawn.step(), pytest.raises(PladisError, match=r"drew noise of shape \(1, 4, 4, 4\)"):
        torch.randn((1, 4, 4, 4), generator=g, dtype=torch.float32)
    with drawn.step():
        torch.randn((1, 4, 8, 8), generator=g, dtype=torch.float32)  # the one draw made
        with pytest.raises(PladisError, match="draw 2 of image 1"):
            torch.randn((1, 4, 8, 8), generator=g, dtype=torch.float32)
        other = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))  # not its generator
    assert torch.equal(other, drawn.table[0])  # a generator it does not own draws as usual


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from pladis.export import ExportConfig, export

    folder = tmp_path_factory.mktemp("noise") / "tiny-sdxl"
    export(ExportConfig(model="tiny-sdxl", out=str(folder), validate=False))
    return folder


@pytest.mark.parametrize("scheduler, prompts", [("euler_a", ["a cat", "a dog"]), ("lcm", ["a cat", "a dog"]),
                                                 ("euler_a", ["a cat"])])  # fmt: skip
def test_the_runtime_with_noise_drawn_ahead_gives_the_same_images(engine, scheduler, prompts, monkeypatch):
    """Runtime.generate with ``draw_ahead`` (as on CUDA) vs off (diffusers draws each step), with CFG; one image
    too (diffusers then calls randn with the one generator, not the list)."""
    from pladis.runtime import Runtime

    rt = Runtime(engine, "torch")
    request = {"prompt": prompts, "steps": 3, "seed": 5, "scheduler": scheduler, "progress": False}
    want = rt.generate(**request)
    takes = []
    take = noise.StepNoise.take
    monkeypatch.setattr(noise.StepNoise, "take", lambda self, *a: takes.append(1) or take(self, *a))
    rt.draw_ahead = True
    got = rt.generate(**request)
    assert len(takes) == len(prompts) * (3 if scheduler == "euler_a" else 2)  # the draws came from the table
    assert torch.equal(got.latents, want.latents)  # atol=0: the same draws, the same float32 steps


# --------------------------------------------------------------------------------------------------
# On a GPU (make gpu-check)
# --------------------------------------------------------------------------------------------------

NO_GPU = None if torch.cuda.is_available() else "no CUDA GPU"


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU is not None, reason=str(NO_GPU))
@pytest.mark.parametrize("name", sorted(noise.DRAWS_PER_STEP))
def test_on_a_gpu_the_steps_wait_for_nothing_and_draw_the_cpus_numbers(name):
    """torch's sync debug mode ("error") raises on a host-device sync: diffusers' per-step copy of CPU-drawn noise
    is one (so the check can fail), the steps with the noise drawn ahead make none; the latents equal the plain
    loop's on the GPU bitwise and the CPU's to float32 rounding."""
    with pytest.raises(RuntimeError, match="synchroniz"):
        loop(name, [1, 2], ahead=False, device="cuda", no_sync=True)
    got, _ = loop(name, [1, 2], ahead=True, device="cuda", no_sync=True)
    want, _ = loop(name, [1, 2], ahead=False, device="cuda")
    assert torch.equal(got, want)  # atol=0: the same numbers through the same CUDA kernels
    cpu, _ = loop(name, [1, 2], ahead=False)
    # the same noise; CUDA's tanh and fused arithmetic may round differently from the CPU's: float32 ulps
    assert ((got.cpu() - cpu).norm() / cpu.norm()).item() <= 1e-5
