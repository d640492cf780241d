"""The backend registry, the typed manifest, explicit loading and warm-up, and the runtime's device policy."""

import json
import subprocess
import sys

import pytest
import torch

from pladis import backends as registry
from pladis.export import ExportConfig, export
from pladis.manifest import Manifest, TensorSpec, open_engine, read_manifest
from pladis.runtime import Runtime
from pladis.runtime import backends as runners


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny-sdxl"
    export(ExportConfig(model="tiny-sdxl", out=str(out), validate=False))
    return out


# --------------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------------


def test_one_registry_for_build_and_run():
    from pladis.engine import BACKENDS as buildable
    from pladis.engine.build import builder_module
    from pladis.runtime.commands import BACKEND_HELP

    assert runners.BACKENDS == registry.NAMES == ("torch", "ort", "aoti", "trt")
    assert buildable == registry.BUILDABLE == ("ort", "aoti", "trt")
    assert BACKEND_HELP.startswith(" | ".join(registry.NAMES))
    for spec in registry.REGISTRY.values():
        cls = runners.runner_class(spec)
        assert all(callable(getattr(cls, m, None)) for m in ("load", "warm_up", "run")), spec.name
        if spec.builder:  # named, not imported, until used: TensorRT's module needs no TensorRT to import
            module = builder_module(spec)
            assert callable(module.build) and callable(module.device_info), spec.name
    assert registry.get("trt").run_device("cpu") == "cuda" and registry.get("ort").run_device("cuda:1") == "cuda:1"
    assert [n for n in registry.NAMES if registry.get(n).lowers_precision] == []  # all run the graph as exported
    with pytest.raises(registry.EngineError, match="unknown backend 'tf'; choose one of torch, ort, aoti, trt"):
        registry.get("tf")


def test_no_stage_imports_another_to_read_the_manifest():
    code = ("import sys, importlib\n"
            "for m in sys.argv[1:]: importlib.import_module(m)\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith(('pladis.runtime', 'pladis.export', "
            "'pladis.engine')))))")  # fmt: skip

    def loaded(*modules):
        run = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, check=True)
        return set(run.stdout.split())

    build = loaded("pladis.engine.build", "pladis.engine.ort", "pladis.engine.cache")
    assert not any(m.startswith(("pladis.runtime", "pladis.export")) for m in build), build
    run = loaded("pladis.runtime.pipeline", "pladis.runtime.backends")
    assert not any(m.startswith(("pladis.engine", "pladis.export")) for m in run), run


# --------------------------------------------------------------------------------------------------
# the manifest
# --------------------------------------------------------------------------------------------------


def test_typed_manifest_reads_the_json_as_written(folder):
    data = json.loads((folder / "manifest.json").read_text())
    m = read_manifest(folder)
    assert m == Manifest.from_dict(data) and m.data == data  # the view keeps the JSON as it is on disk
    assert m.family == data["model"]["family"] and m.precision == data["precision"] and m.seed == data["model"]["seed"]
    assert m.dims == {k: tuple(v) for k, v in data["dims"].items()}
    assert m.component_names() == list(data["components"]) and m.denoiser == "unet"
    assert m.component_names("text_encoder") == ["text_encoder", "text_encoder_2"]
    for name, comp in m.components.items():
        raw = data["components"][name]
        assert (comp.file, comp.sha256, comp.dtype, comp.role) == (
            raw["file"],
            raw["sha256"],
            raw["dtype"],
            raw["role"],
        )
        assert [t.to_dict() for t in comp.inputs] == raw["inputs"]  # the export writes TensorSpec.to_dict
        assert [t.to_dict() for t in comp.outputs] == raw["outputs"]
    assert m.pladis.lam_input == data["pladis"]["lam_input"] and list(m.pladis.lam_range) == data["pladis"]["lam_range"]
    assert m.vae.scale_factor == data["vae"]["scale_factor"] and m.image.height == data["image"]["height"]
    spec = m.components["unet"].inputs[0]
    assert TensorSpec.from_dict(spec.to_dict()) == spec and spec.min <= spec.opt <= spec.max
    engine = open_engine(folder)
    assert engine.manifest == m and engine.built is None and engine.artifact("unet") is None


# --------------------------------------------------------------------------------------------------
# loading, warm-up and devices
# --------------------------------------------------------------------------------------------------


class SpyBackend:
    """ONNX Runtime, recording each call and checking that every input is on the runtime's device type."""

    events: list = []
    reuses_outputs = False

    def __init__(self, engine, component, device):
        self.inner, self.component, self.device = runners.OrtBackend(engine, component, device), component, device

    def _check(self, inputs):
        for name, t in inputs.items():
            assert t.device.type == torch.device(self.device).type, (self.component, name, t.device)

    def load(self):
        self.events.append(("load", self.component))
        self.inner.load()

    def warm_up(self, inputs):
        self._check(inputs)
        self.events.append(("warm_up", self.component))
        self.inner.warm_up(inputs)

    def run(self, inputs):
        self._check(inputs)
        self.events.append(("run", self.component))
        outs = self.inner.run(inputs)
        assert all(t.device.type == torch.device(self.device).type for t in outs.values())
        return outs


@pytest.fixture
def spy(monkeypatch):
    SpyBackend.events = []
    monkeypatch.setitem(registry.REGISTRY, "spy", registry.BackendRecord("spy", f"{__name__}:SpyBackend", None,
                                                                     ("cpu",), ()))  # fmt: skip
    return SpyBackend.events


def test_generate_loads_and_warms_up_before_its_clocks(folder, spy):
    rt = Runtime(folder, "spy")
    first = rt.generate("a cube", steps=2, progress=False)
    names = list(rt.backend_names)
    loads = [e for e in spy if e[0] == "load"]
    assert loads == [("load", n) for n in names] and spy[: len(names)] == loads  # every session before any run
    runs = [e for e in spy if e[0] != "load"]
    denoise = [i for i, e in enumerate(runs) if e[1] == "unet"]
    assert runs[denoise[0]] == ("warm_up", "unet") and [runs[i][0] for i in denoise[1:]] == ["run", "run"]
    assert runs.index(("warm_up", "vae_decoder")) < denoise[1]  # the VAE is warm before the timed loop too
    assert first.timings["load"] > 0 and set(first.timings) >= {"encode", "per_step", "decode", "total"}
    spy.clear()
    again = rt.generate("a cube", steps=2, progress=False)
    assert all(e[0] == "run" for e in spy)  # loaded and warm: the second call only runs
    assert again.timings["load"] < first.timings["load"]
    assert torch.equal(first.latents, again.latents)  # warm-up changes no result


def test_cpu_runtime_keeps_every_tensor_on_the_cpu(folder, spy):
    rt = Runtime(folder, "spy", device="cpu")
    s = rt.settings("a cube", steps=2, lam=1.5)
    cond, sched, latents = rt.prepare(s)
    assert latents.device.type == "cpu" and all(t.device.type == "cpu" for t in cond.values())
    out = rt.generate("a cube", steps=2, lam=1.5, progress=False)  # SpyBackend checks every input it is given
    assert out.latents.device.type == "cpu" and out.images and {e[0] for e in spy} == {"load", "warm_up", "run"}


def _random_inputs(spec, seed: int, repeat: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    """Random inputs at the optimal shapes, the batch axis repeated ``repeat`` times."""
    rand = {t.name: torch.rand(t.opt, generator=g).to(getattr(torch, t.dtype)) for t in spec.inputs}
    return {n: torch.cat([x] * repeat) for n, x in rand.items()}


def test_bound_ort_writes_into_one_buffer_per_shape(folder):
    engine = open_engine(folder)
    plain, bound = (runners.create(engine, "unet", "ort") for _ in range(2))
    bound.bound = True  # I/O binding as on CUDA, here on the CPU provider
    assert bound.reuses_outputs and not plain.reuses_outputs
    spec = engine.component("unet")
    first = bound.run(_random_inputs(spec, 0))["out_sample"]
    kept = first.clone()
    assert torch.equal(kept, plain.run(_random_inputs(spec, 0))["out_sample"])  # the same numbers, bound or not
    second = bound.run(_random_inputs(spec, 1))["out_sample"]
    assert torch.equal(second, plain.run(_random_inputs(spec, 1))["out_sample"])
    assert second.data_ptr() == first.data_ptr() and torch.equal(first, second)  # one buffer, overwritten
    doubled = bound.run(_random_inputs(spec, 2, repeat=2))["out_sample"]  # other shapes: another buffer
    assert doubled.shape[0] == 2 * second.shape[0] and doubled.data_ptr() != second.data_ptr()
    assert bound.run(_random_inputs(spec, 1))["out_sample"].data_ptr() == first.data_ptr()  # and back


def test_reused_output_buffers_are_copied_for_the_caller(folder):
    rt = Runtime(folder, "ort")
    rt.backend("vae_decoder").bound = True
    x = {"latent_sample": torch.zeros(rt.engine.component("vae_decoder").inputs[0].opt)}
    a = rt.run("vae_decoder", x)["sample"]
    b = rt.run("vae_decoder", x)["sample"]
    assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()  # each call's result is the caller's own
