"""LoRA without a rebuild: the weight map every export writes (module path -> the ONNX initializer holding it)."""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from pladis import models
from pladis.export import ExportConfig, export

TINY = [n for n in models.BUILTINS if n.startswith("tiny-")]


@pytest.mark.parametrize("name", TINY)
def test_weight_map_covers_every_linear_and_holds_its_values(tmp_path, name):
    """Every nn.Linear of each LoRA-addressable component (denoiser, text encoders) is in the map, and the named
    initializer holds exactly that weight (transposed where the map says so). Reference: the freshly built
    pipeline's own weights (same seed), not the exporter's module. Misses: none (the VAE decoder is no LoRA target
    and has no map)."""
    from pladis.export import contracts

    manifest = export(ExportConfig(model=name, out=str(tmp_path / "out"), validate=False))
    pipe = models.load(name, seed=manifest["model"]["seed"])
    # the module each component's graph computes: the pipeline's attribute, or the part of it that is exported
    # (Qwen-Image's text decoder without the LM head and vision tower)
    exported = {c.name: c for c in contracts.components(pipe, manifest["model"]["family"])}
    dims = {k: tuple(v) for k, v in manifest["dims"].items()}
    for comp_name, comp in manifest["components"].items():
        if comp["role"] == "vae_decoder":
            assert comp["weights"] == {} and comp["weights_missing"] == {}
            continue
        module = exported[comp_name].module
        linears = {n: m for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
        # misses: only layers that never reach the outputs (Qwen-Image's last text-stream layers, pruned by the
        # exporter; FLUX.2 [dev]'s vision tower and projector: its prompts carry no images); a LoRA on them changes
        # nothing
        dead = _unused(exported[comp_name], dims, linears, comp["weights_missing"])
        assert set(comp["weights_missing"]) == dead, f"{name} {comp_name} misses {sorted(comp['weights_missing'])}"
        assert set(comp["weights"]) == set(linears) - dead
        inits = {t.name: t for t in onnx.load(str(tmp_path / "out" / comp["file"])).graph.initializer}
        for path, entry in comp["weights"].items():
            value = numpy_helper.to_array(inits[entry["initializer"]])
            want = linears[path].weight.detach().float().numpy()
            np.testing.assert_array_equal(value.T if entry["transposed"] else value, want)  # bitwise: same bytes


def _unused(comp, dims: dict, linears: dict, names) -> set[str]:
    """The layers among ``names`` whose weights do not reach ``comp``'s outputs: changing one leaves them bitwise."""
    from pladis.export import contracts

    inputs = contracts.sample_inputs(comp, dims, torch.float32)
    with torch.no_grad():
        before = contracts.Traced(comp)(*inputs)
        out = set()
        for name in names:
            w = linears[name].weight
            saved = w.clone()
            w.add_(1.0)
            after = contracts.Traced(comp)(*inputs)
            w.copy_(saved)
            if all(torch.equal(a, b) for a, b in zip(before, after, strict=True)):
                out.add(name)
    return out
