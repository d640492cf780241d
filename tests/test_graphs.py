"""The CUDA-graph cache (pladis.runtime.graphs): keys, bounds, eviction, static buffers, the eager fallback.

No CUDA graph is captured here (no GPU in CI). Two capture functions drive the cache's real code path:
- ``graphs.cuda_capture`` itself, which on a machine without a GPU raises: the fallback path;
- ``Recorder`` below, which records each capture and returns a "replay" that calls the eager function again
  on the cache's static input buffers and copies its results into the static outputs. It is NOT a CUDA graph;
  it has a graph's contract (reads only the static inputs, writes only the static outputs), so a cache that
  forgot to copy new inputs in, or returned something other than the static outputs, gives wrong numbers here.
"""

import logging

import pytest
import torch

from pladis.errors import SettingError
from pladis.runtime import graphs


class Recorder:
    """A capture function with a CUDA graph's contract but none of its mechanics (see the module docstring)."""

    def __init__(self, fail_for=()):
        self.calls = []  # the static inputs of each capture
        self.fail_for = fail_for  # shapes of "x" whose capture raises

    def __call__(self, call):
        first = call()  # the call closes over the cache's static input buffers
        shape = tuple(next(iter(first.values())).shape)
        self.calls.append(shape)
        if shape in self.fail_for:
            raise RuntimeError("operation not permitted when stream is capturing\nsecond line")
        outputs = {k: v.clone() for k, v in first.items()}

        def replay():
            for k, v in call().items():
                outputs[k].copy_(v)

        return replay, outputs


def model(inputs):
    """A component: y = x * lam + t (lam, t: (B,) tensors broadcast over x's trailing dims)."""
    x, lam, t = inputs["x"], inputs["lam"], inputs["t"]
    return {"y": x * lam.view(-1, 1) + t.view(-1, 1)}


def inputs(batch=2, n=3, lam=1.0, t=0.0, seed=0):
    x = torch.randn(batch, n, generator=torch.Generator().manual_seed(seed))
    return {"x": x, "lam": torch.full((batch,), lam), "t": torch.full((batch,), t)}


def test_captures_once_per_key_after_warmup_and_serves_every_lam_and_timestep():
    rec = Recorder()
    cache = graphs.GraphCache(rec, size=4, warmup=1)
    for step, lam in enumerate([0.0, 1.0, 2.5, 4.0]):  # lam and t vary per call: inputs, not part of the key
        feed = inputs(lam=lam, t=float(step), seed=step)
        got = cache.run("unet", model, feed)
        assert torch.equal(got["y"], model(feed)["y"])  # atol=0: the same float32 ops on the same values
    assert rec.calls == [(2, 3)] and cache.captures == 1  # call 1 eager (warm-up), call 2 captured, 3-4 replayed
    key = graphs.key_of("unet", inputs())
    assert key in cache and cache.settled("unet", inputs())


def test_replay_returns_the_static_outputs_overwritten_by_the_next_call():
    cache = graphs.GraphCache(Recorder(), warmup=0)
    a = cache.run("unet", model, inputs(lam=1.0))
    kept = a["y"].clone()
    b = cache.run("unet", model, inputs(lam=3.0))
    assert a["y"] is b["y"]  # the graph's own buffer: the caller copies what it keeps
    assert not torch.equal(a["y"], kept)


def test_a_new_shape_dtype_or_component_is_a_new_key_and_the_bound_drops_the_least_recent():
    rec = Recorder()
    cache = graphs.GraphCache(rec, size=2, warmup=0)
    cache.run("unet", model, inputs(n=3))
    cache.run("unet", model, inputs(n=4))
    cache.run("unet", model, inputs(n=3))  # a hit: (2, 3) is now the most recent
    cache.run("unet", model, inputs(n=5))  # a third key: (2, 4) goes
    assert rec.calls == [(2, 3), (2, 4), (2, 5)]
    assert [k[1][2][1] for k in cache.graphs] == [(2, 3), (2, 5)]  # the x entry's shape, oldest first
    cache.run("unet", model, inputs(n=4))  # dropped before: captured again
    assert rec.calls[-1] == (2, 4) and len(cache.graphs) == 2
    half = {k: v.double() for k, v in inputs(n=3).items()}
    assert graphs.key_of("unet", half) != graphs.key_of("unet", inputs(n=3))
    assert graphs.key_of("transformer", inputs(n=3)) != graphs.key_of("unet", inputs(n=3))


def test_a_failed_capture_warns_once_runs_eagerly_and_is_not_retried(caplog):
    rec = Recorder(fail_for={(2, 3)})
    cache = graphs.GraphCache(rec, warmup=0)
    with caplog.at_level(logging.WARNING, logger="pladis.runtime.graphs"):
        for lam in (1.0, 2.0, 3.0):
            feed = inputs(lam=lam)
            assert torch.equal(cache.run("unet", model, feed)["y"], model(feed)["y"])  # atol=0: eager itself
    assert rec.calls == [(2, 3)]  # tried once
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0] and "stream is capturing" in lines[0]
    assert cache.captures == 0 and cache.settled("unet", inputs())
    cache.run("unet", model, inputs(n=4))  # another shape is another try
    assert rec.calls == [(2, 3), (2, 4)] and cache.captures == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the capture would succeed")
def test_the_real_cuda_capture_refuses_without_a_gpu_and_the_cache_falls_back(caplog):
    cache = graphs.GraphCache(warmup=1)  # graphs.cuda_capture, as the runtime uses it
    assert cache.capture is graphs.cuda_capture
    with caplog.at_level(logging.WARNING, logger="pladis.runtime.graphs"):
        outs = [cache.run("unet", model, inputs(lam=lam)) for lam in (0.0, 2.0, 2.0)]
    for lam, out in zip((0.0, 2.0, 2.0), outs, strict=True):
        assert torch.equal(out["y"], model(inputs(lam=lam))["y"])  # atol=0: the eager function's own result
    assert cache.captures == 0 and len(cache.failed) == 1 and len(caplog.records) == 1


def test_bad_sizes_are_setting_errors():
    with pytest.raises(SettingError, match="graph_cache_size must be a whole number >= 1"):
        graphs.GraphCache(Recorder(), size=0)
    with pytest.raises(SettingError, match="graph_warmup"):
        graphs.GraphCache(Recorder(), warmup=-1)


# --------------------------------------------------------------------------------------------------
# The runtime's switch (Runtime(..., cuda_graphs=...)): on a CPU only the refusal and the cache's code path
# with the Recorder or the real (refusing) capture run; parity with real CUDA graphs needs a GPU.
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from pladis.export import ExportConfig, export

    folder = tmp_path_factory.mktemp("graphs") / "tiny-sd15"
    export(ExportConfig(model="tiny-sd15", out=str(folder), validate=False))
    return folder


def test_cuda_graphs_on_a_cpu_device_is_a_setting_error_naming_the_fix(engine, capsys):
    from pladis import cli
    from pladis.runtime import Runtime

    with pytest.raises(SettingError, match="CUDA graphs need a CUDA device .* --device cuda, or drop --cuda-graphs"):
        Runtime(engine, "torch", cuda_graphs=True)
    assert cli.main(["generate", "--engine", str(engine), "--cuda-graphs", "--out", "/nonexistent/x.png"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "drop --cuda-graphs" in err[0]
    assert cli.main(["parity", "--engine", str(engine), "--cuda-graphs"]) == 2
    assert "drop --cuda-graphs" in capsys.readouterr().err
    from pladis.serve.config import ServeConfig, validate

    with pytest.raises(SettingError, match="--cuda-graphs True: CUDA graphs need a CUDA device") as err:
        validate(ServeConfig(engine=str(engine), cuda_graphs=True))
    assert err.value.field == "cuda_graphs"
    with pytest.raises(SettingError, match="--graph-cache-size 0: must be at least 1"):
        validate(ServeConfig(engine=str(engine), device="cuda", cuda_graphs=True, graph_cache_size=0))


def test_the_loop_through_the_cache_equals_the_eager_loop_at_every_lam_with_one_capture(engine):
    from pladis.runtime import Runtime

    rec = Recorder()
    graphed = Runtime(engine, "torch", cuda_graphs=graphs.GraphCache(rec))
    eager = Runtime(engine, "torch")
    for lam in (0.0, 2.0):
        a = graphed.generate("a cat", steps=3, seed=1, lam=lam, progress=False).latents
        b = eager.generate("a cat", steps=3, seed=1, lam=lam, progress=False).latents
        assert torch.equal(a, b)  # atol=0: the same float32 calls on the same values, through static buffers
    assert len(rec.calls) == 1 and graphed.graphs.captures == 1  # captured in warm-up; both lams replayed it


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the capture would succeed")
def test_the_loop_with_the_real_capture_falls_back_to_eager_on_a_cpu(engine, caplog):
    from pladis.runtime import Runtime

    graphed = Runtime(engine, "torch", cuda_graphs=graphs.GraphCache(graphs.cuda_capture))
    with caplog.at_level(logging.WARNING, logger="pladis.runtime.graphs"):
        a = graphed.generate("a cat", steps=2, seed=1, progress=False).latents
        graphed.generate("a cat", steps=2, seed=1, progress=False)  # not retried
    b = Runtime(engine, "torch").generate("a cat", steps=2, seed=1, progress=False).latents
    assert torch.equal(a, b)  # atol=0: the fallback is the eager call itself
    assert len(caplog.records) == 1 and len(graphed.graphs.failed) == 1


@pytest.mark.parametrize("graphed", [False, True])
def test_the_cfg_batch_is_one_buffer_per_request_and_changes_nothing(engine, monkeypatch, graphed):
    """DDIM scales no input, so the denoiser gets the CFG batch itself: the same buffer every step of a request
    (written in place), and the latents equal those of a loop that makes a new batch each step (cfg_batch None),
    eagerly and through the cache (Recorder: the outputs then are its static buffers, read in place)."""
    from pladis.runtime import Runtime

    rt = Runtime(engine, "torch", cuda_graphs=graphs.GraphCache(Recorder()) if graphed else False)
    b = rt.backend(rt.engine.denoiser)
    run, seen, buffers = b.run, [], []
    monkeypatch.setattr(b, "run", lambda inputs: seen.append(inputs["sample"].data_ptr()) or run(inputs))
    make = rt.cfg_batch
    monkeypatch.setattr(rt, "cfg_batch", lambda latents, s: buffers.append(make(latents, s)) or buffers[-1])
    request = {"prompt": "a cat", "steps": 3, "seed": 2, "scheduler": "ddim", "progress": False}
    got = rt.generate(**request)
    assert rt.settings("a cat").negatives is not None and buffers[0].shape[0] == 2  # CFG: the batch of two
    if not graphed:  # the warm-up's own batch, then the three steps in the request's buffer (kept alive here)
        assert seen[1:] == [buffers[0].data_ptr()] * 3
    monkeypatch.setattr(rt, "cfg_batch", lambda latents, s: None)
    want = rt.generate(**request)
    assert torch.equal(got.latents, want.latents)  # atol=0: the same float32 values, only where they are written


def test_the_host_loop_benchmark_runs_the_real_loop_with_a_denoiser_that_does_nothing(engine):
    from pladis import backends as registry
    from pladis.bench import host_loop

    r = host_loop.measure(engine, "euler", None, steps=2, repeats=1)
    assert "null" not in registry.REGISTRY  # plugged in for the measurement only
    assert r["cfg"] and r["steps"] == 2 and r["repeats"] == 1
    h = r["host_ms_per_step"]
    # no speed asserted (a shared CI machine); the host share cannot exceed the step it is part of
    assert 0 < h["min"] <= h["median"] <= h["max"] <= r["step_ms_with_null_denoiser"]


# --------------------------------------------------------------------------------------------------
# On a GPU (make gpu-check): real CUDA graphs
# --------------------------------------------------------------------------------------------------

NO_GPU = None if torch.cuda.is_available() else "no CUDA GPU"


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU is not None, reason=str(NO_GPU))
def test_cuda_capture_replays_new_inputs_on_a_gpu():
    cache = graphs.GraphCache(graphs.cuda_capture, warmup=1)
    for lam in (0.0, 1.0, 2.0, 3.0):
        feed = {k: v.cuda() for k, v in inputs(lam=lam, t=lam).items()}
        got = cache.run("unet", model, feed)["y"].clone()
        assert torch.equal(got, model(feed)["y"])  # atol=0: the replayed kernels are the eager ones
    assert cache.captures == 1 and not cache.failed


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU is not None, reason=str(NO_GPU))
def test_the_torch_backend_with_cuda_graphs_equals_eager_on_a_gpu(engine):
    from pladis.runtime import Runtime

    graphed = Runtime(engine, "torch", device="cuda", cuda_graphs=True)
    eager = Runtime(engine, "torch", device="cuda")
    for lam in (0.0, 2.0):
        a = graphed.generate("a cat", steps=3, seed=1, lam=lam, progress=False).latents
        b = eager.generate("a cat", steps=3, seed=1, lam=lam, progress=False).latents
        # fp32: a replay runs the captured kernels on the same values; 1e-6 leaves room for a cuBLAS algorithm
        # chosen differently under capture
        assert ((a - b).norm() / b.norm()).item() <= 1e-6
    assert graphed.graphs.captures == 1 and not graphed.graphs.failed
