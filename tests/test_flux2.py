"""FLUX.2 ([klein] layout, ``tiny-flux2``): its record against Flux2Pipeline's own code, patching against the
stock processors, export against eager, and the runtime through parity."""

import pytest
import torch
from test_patch import TOL_MODEL, ReferenceProcessor
from tiny_cases import denoiser_case, forward

import pladis
from pladis import families, models

NAME = "tiny-flux2"


@pytest.fixture
def flux2():
    model, kwargs = denoiser_case(NAME)
    yield model, kwargs
    pladis.remove(model)


def _stock(model):
    return {n: m.get_processor() for n, m in model.named_modules() if hasattr(m, "set_processor")}


def test_lam_zero_and_remove_are_the_stock_model_bitwise(flux2):
    model, kwargs = flux2
    before = forward(model, kwargs)
    assert pladis.apply(model, lam=0.0).layers == []
    assert torch.equal(forward(model, kwargs), before)  # atol=0: lam=0 leaves the stock path
    pladis.apply(model, lam=2.0)
    assert pladis.remove(model) == 2
    assert torch.equal(forward(model, kwargs), before)  # atol=0: the stock processors are back


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_patched_matches_the_stock_processor_with_the_formula(flux2, alpha):
    # reference: diffusers' own Flux2AttnProcessor, its SDPA call answered by the float64 formula on the
    # image-query x text-key block ([text, image] order)
    model, kwargs = flux2
    stock_out = forward(model, kwargs)
    stock = _stock(model)
    report = pladis.apply(model, lam=2.0, alpha=alpha)
    patched = forward(model, kwargs)
    pladis.remove(model)
    modules = dict(model.named_modules())
    for name in report.layers:
        modules[name].set_processor(ReferenceProcessor(stock[name], 2.0, alpha, text_first=True))
    try:
        reference = forward(model, kwargs)
    finally:
        for name in report.layers:
            modules[name].set_processor(stock[name])
    torch.testing.assert_close(patched, reference, **TOL_MODEL)  # float32 vs float64 attention, see TOL_MODEL
    assert (patched - stock_out).abs().max() > 1e-3, "PLADIS did not change the output: the test would prove nothing"


def test_double_stream_blocks_are_patched_and_single_stream_ones_are_not():
    pipe = models.load(NAME, device="meta")
    names = pladis.apply(pipe, layers="all").layers
    assert names == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    assert len(pipe.transformer.single_transformer_blocks) == 1  # there, and left stock
