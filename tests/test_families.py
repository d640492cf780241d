"""The family registry: one record per family, consistent with its built-in model, and the only place that
names a family."""

import ast
from pathlib import Path

import pytest
import torch

import pladis
from pladis import families, models, patch
from pladis.export import contracts

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ["pladis", "export", "runtime", "engine", "plugins_trt", "bench"]  # pladis/* symlinks are deduplicated
# (file, literal): a string equal to a family name that means something else there
ALLOWED = {
    ("bench/suite.py", "unet"): "the U-Net component's exported file name, not the family",
}
BUILTIN_OF = {"unet": ["tiny-sd15", "tiny-sdxl"], "pixart": ["tiny-pixart"], "sd3": ["tiny-sd3"], "flux": ["tiny-flux"]}


def _family_literals(top: Path = ROOT) -> list[tuple[str, int, str]]:
    """(file, line, literal) of every string constant equal to a family name outside pladis/families/."""
    names, seen, hits = set(families.FAMILIES), set(), []
    for root in SCANNED:
        for path in sorted((top / root).rglob("*.py")):
            real = path.resolve()
            if real in seen or real.parent == Path(families.__file__).resolve().parent:  # the registry's package
                continue
            seen.add(real)
            rel = real.relative_to(top.resolve()).as_posix()
            for node in ast.walk(ast.parse(real.read_text(), rel)):
                if isinstance(node, ast.Constant) and node.value in names and (rel, node.value) not in ALLOWED:
                    hits.append((rel, node.lineno, node.value))
    return hits


def test_only_the_registry_names_families():
    hits = _family_literals()
    assert not hits, "family names outside pladis/families/ (look the record up instead): " + ", ".join(
        f"{f}:{line} {v!r}" for f, line, v in hits
    )


def test_the_scan_sees_a_family_switch(tmp_path):
    """The scan catches a switch like the ones the registry replaced."""
    (tmp_path / "runtime").mkdir()
    (tmp_path / "runtime" / "switch.py").write_text('def f(family):\n    return family == "flux"\n')
    assert _family_literals(tmp_path) == [("runtime/switch.py", 2, "flux")]


def test_every_family_has_a_tiny_builtin_and_a_consistent_contract():
    assert set(BUILTIN_OF) == set(families.FAMILIES)
    for name, builtins in BUILTIN_OF.items():
        fam = families.get(name)
        assert fam.name == name and families.FAMILIES[name] is fam
        for builtin in builtins:
            pipe = models.load(builtin, device="meta")  # structure only: contracts read configs
            assert families.of_model(patch.denoiser_of(pipe)) is fam
            denoiser = next(c for c in contracts.components(pipe, name) if c.denoiser)
            assert denoiser.name == fam.component and denoiser.inputs[0].name == fam.sample_input
            assert denoiser.extras["timestep_scale"] == fam.timestep_scale
            assert "text" in [x for t in denoiser.inputs for x in t.shape]


def test_unknown_and_unsupported_families_name_the_supported_ones():
    with pytest.raises(ValueError, match=r"unknown model family 'sana'; supported families: unet .*flux"):
        families.get("sana")
    with pytest.raises(ValueError, match=r"unknown model family"):
        contracts.text_lengths(None, "sana")


def test_sana_is_refused_with_the_reason_and_the_supported_families():
    from diffusers import SanaTransformer2DModel

    with torch.device("meta"):
        sana = SanaTransformer2DModel(
            patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=4, num_attention_heads=2,
            num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
            sample_size=8,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"SanaTransformer2DModel \(SANA needs a Gemma.*supported families: unet"):
        pladis.apply(sana)


def test_vae_rule():
    latents = torch.full((1, 4, 2, 2), 3.0)
    assert torch.equal(families.vae_latents(latents, 1.5, None), latents / 1.5)
    assert torch.equal(families.vae_latents(latents, 1.5, 0.25), latents / 1.5 + 0.25)
    pipe = models.load("tiny-sd15", device="meta")
    assert families.vae_scale_factor(pipe.vae.config) == 2
