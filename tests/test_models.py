"""Built-in models: deterministic random weights, offline tokenizers, the from_pretrained path, whole pipelines."""

import numpy as np
import pytest
import torch

import pladis
from pladis import models
from pladis.errors import PladisError

TINY = [name for name in models.BUILTINS if name.startswith("tiny-")]


def _params(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{c}.{n}": p
        for c, m in pipe.components.items()
        if isinstance(m, torch.nn.Module)
        for n, p in m.named_parameters()
    }


def test_seeded_and_global_rng_untouched():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = models.load("tiny-sdxl", seed=0), models.load("tiny-sdxl", seed=0), models.load("tiny-sdxl", seed=1)
    assert torch.equal(torch.rand(1), expected_next)  # load() forks the RNG
    pa, pb, pc = _params(a), _params(b), _params(c)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert any(not torch.equal(pa[k], pc[k]) for k in pa)
    assert all(not m.training for m in a.components.values() if isinstance(m, torch.nn.Module))


def test_offline_tokenizers():
    clip = models.char_tokenizer("clip", 77)
    ids = clip("A cat!", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == clip.bos_token_id and ids[6] == clip.eos_token_id
    assert clip.decode(ids[1:6]).replace(" ", "") == "acat!"  # lower-cased, one token per character
    t5 = models.char_tokenizer("t5", 16)
    enc = t5("dog", padding="max_length", max_length=16)
    assert enc.input_ids[:4] == [*t5.convert_tokens_to_ids(list("dog")), t5.eos_token_id]
    assert enc.attention_mask == [1] * 4 + [0] * 12 and t5.pad_token_id == 0


def test_from_pretrained_path_roundtrip(tmp_path):
    # The user path (a diffusers folder) goes through DiffusionPipeline.from_pretrained, offline.
    pipe = models.load("tiny-sd15")
    pipe.save_pretrained(tmp_path / "tiny")
    loaded = models.load(str(tmp_path / "tiny"))
    assert type(loaded).__name__ == "StableDiffusionPipeline"
    pa, pb = _params(pipe), _params(loaded)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def test_unknown_model_error():
    with pytest.raises(ValueError, match="not a built-in.*tiny-sd15"):
        models.load("./no/such/folder")


@pytest.mark.parametrize("name", TINY)
def test_pipeline_end_to_end_with_pladis(name):
    pipe, spec = models.load(name), models.BUILTINS[name]
    call = dict(
        prompt="a red cube",
        num_inference_steps=2,
        height=spec.height,
        width=spec.width,
        output_type="np",
        **spec.call_kwargs,
    )

    def run():
        return pipe(**call, generator=torch.Generator().manual_seed(0)).images

    stock = run()
    report = pladis.apply(pipe)
    patched = run()
    pladis.remove(pipe)
    assert report.layers
    assert np.isfinite(patched).all() and patched.shape == stock.shape
    assert np.abs(patched - stock).max() > 1e-4  # PLADIS reached the sampled image
    assert np.array_equal(run(), stock)  # atol=0: remove restores the stock pipeline exactly


def test_a_hub_id_that_cannot_be_fetched_is_one_clean_line(tmp_path, monkeypatch, capsys):
    # issue 22 D11: diffusers' reason pointed at "the root cause in the stacktrace above", which a one-line
    # error never shows, and its "couldn't connect" warning came on lines of its own
    from huggingface_hub import constants

    from pladis import cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    assert cli.main(["layers", "--model", "org/name"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pladis layers: error: cannot load model 'org/name'") and "\n" not in err, err
    assert "stacktrace" not in err and "not in the local Hugging Face cache" in err


def test_a_name_that_is_no_builtin_folder_or_hub_id_is_refused_without_asking_the_hub(monkeypatch, capsys):
    # a new user's typo: `pladis layers --model tiny-sdxxl` went to from_pretrained, waited on the hub, and said
    # the Hub could not be reached; export said "unknown model" at once. Now both say it, with the close names.
    import diffusers

    from pladis import cli

    def no_hub(*args, **kwargs):
        raise AssertionError("from_pretrained called for a name that is no hub id")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", no_hub)
    assert cli.main(["layers", "--model", "tiny-sdxxl"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pladis layers: error: unknown model 'tiny-sdxxl' (did you mean 'tiny-sdxl'"), err
    assert "\n" not in err
    with pytest.raises(PladisError, match="unknown model 'nope': use a built-in"):  # no close name: no hint
        models.load("nope")
