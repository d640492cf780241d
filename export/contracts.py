"""Export contracts: components, input/output names, dynamic axes, shape ranges, samples.

Names follow diffusers' argument names (as Optimum and NVIDIA's diffusion demo do). Every shape is written
with named dims; ``dims()`` gives each dim its (min, opt, max) from one source (the export settings), and
sample inputs, dynamic axes and the manifest's shape ranges are all derived from that.
"""

from __future__ import annotations

import torch
from torch import nn

from pladis import families
from pladis.contracts import FLOAT, Component, Port
from pladis.errors import SettingError

__all__ = ["FLOAT", "Component", "Port"]  # the vocabulary (pladis.contracts), as the export stage's readers use it


class Traced(nn.Module):
    """Positional-argument wrapper the exporter traces; returns a tuple of tensors."""

    def __init__(self, component: Component):
        super().__init__()
        self.component, self.module = component, component.module

    def forward(self, *args):
        names = [i.name for i in self.component.inputs]
        return tuple(self.component.forward(self.module, **dict(zip(names, args, strict=True))))


# --------------------------------------------------------------------------------------------------
# Dims
# --------------------------------------------------------------------------------------------------


def dims(pipe, family: str, *, height: int, width: int, batch: int, static: bool) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every named dim. Images range over [size/2, 2*size] per side (at least two
    latent units), prompts over
    [1, max(4, batch)]; the denoiser batch (CFG doubles it) over [1, 2*max prompts]."""
    fam = families.get(family)
    vae = fam.vae_scale(pipe.vae.config)
    unit = check_size(pipe, family, height, width)
    prompts = max(4, batch)
    d = {
        "batch": (1, batch, prompts),
        "cfg_batch": (1, 2 * batch, 2 * prompts),
        # at least two units a side: PixArt's output squeeze must never see a single token
        "latent_height": (max(2 * unit, height // 2) // vae, height // vae, 2 * height // vae),
        "latent_width": (max(2 * unit, width // 2) // vae, width // vae, 2 * width // vae),
    }
    d["height"] = tuple(x * vae for x in d["latent_height"])
    d["width"] = tuple(x * vae for x in d["latent_width"])
    d.update(fam.extra_dims(d))
    for name, length in text_lengths(pipe, family).items():
        d[name] = (length, length, length) if fam.joint else (1, length, max(length, 3 * length))
        if name == "clip_text":
            d[name] = (length, length, length)  # CLIP has absolute position embeddings: always padded to 77
    if static:
        d = {name: (opt, opt, opt) for name, (_, opt, _) in d.items()}
    return d


def check_size(pipe, family: str, height: int, width: int) -> int:
    """``SettingError`` unless both sides are multiples of ``size_multiple``; returns that multiple. Reads
    configs only, so a pipeline built on the meta device answers it before any weights exist."""
    unit = size_multiple(pipe, family)
    for name, size in (("height", height), ("width", width)):
        if size % unit:
            raise SettingError("size", f"{name} must be a multiple of {unit} for this model; got {size}")
    return unit


def size_multiple(pipe, family: str) -> int:
    """Image sides must be multiples of this many pixels: the VAE factor times the denoiser's own factor
    (the family record's: U-Net down-sampling levels; FLUX's 2x2 latent packing; PixArt's 2x2 patches)."""
    return families.get(family).size_multiple(pipe)


def text_lengths(pipe, family: str) -> dict[str, int]:
    """Token lengths: CLIP always 77; T5 the pipeline's default ``max_sequence_length``; joint models
    concatenate (SD3: CLIP 77 + T5). Joint models keep text static: the PladisAttention node's
    ``text_len`` attribute is that length."""
    fam = families.get(family)
    out = {"clip_text": families.CLIP_LENGTH}
    if fam.t5_length:
        out["t5_text"] = fam.t5_length
    out["text"] = fam.text_length
    return out


# --------------------------------------------------------------------------------------------------
# Components (the denoiser's contract is its family record's ``contract``)
# --------------------------------------------------------------------------------------------------


def _clip(name: str, module) -> Component:
    projected = hasattr(module, "text_projection")
    hidden = module.config.hidden_size

    def fwd(m, input_ids):
        out = m(input_ids=input_ids, output_hidden_states=True)
        pooled = out.text_embeds if projected else out.pooler_output
        return out.last_hidden_state, out.hidden_states[-2], pooled

    pooled = (Port("text_embeds", ("batch", module.config.projection_dim)) if projected
              else Port("pooler_output", ("batch", hidden)))  # fmt: skip
    outputs = [Port("last_hidden_state", ("batch", "clip_text", hidden)),
               Port("penultimate_hidden_state", ("batch", "clip_text", hidden)), pooled]  # fmt: skip
    ids = Port("input_ids", ("batch", "clip_text"), "int64", "ids")
    return Component(name, module, [ids], outputs, fwd, extras={"vocab": module.config.vocab_size})


def _t5(name: str, module) -> Component:
    def fwd(m, input_ids, attention_mask):
        return (m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state,)

    inputs = [Port("input_ids", ("batch", "t5_text"), "int64", "ids"),
              Port("attention_mask", ("batch", "t5_text"), "int64", "mask")]  # fmt: skip
    outputs = [Port("last_hidden_state", ("batch", "t5_text", module.config.d_model))]
    return Component(name, module, inputs, outputs, fwd, extras={"vocab": module.config.vocab_size})


def _vae_decoder(vae) -> Component:
    def fwd(m, latent_sample):
        return (m.decode(latent_sample, return_dict=False)[0],)

    c = vae.config.latent_channels
    return Component("vae_decoder", vae, [Port("latent_sample", ("batch", c, "latent_height", "latent_width"))],
                     [Port("sample", ("batch", vae.config.out_channels, "height", "width"))], fwd)  # fmt: skip


def _text_encoders(pipe) -> list[Component]:
    out = []
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        out.append(_t5(name, module) if "T5" in type(module).__name__ else _clip(name, module))
    return out


def component_dtype(comp: Component, precision: torch.dtype) -> torch.dtype:
    """The float type a component is exported in: the export precision, except text encoders (always
    float32: transformers' CLIP/T5 do not trace to a type-consistent fp16/bf16 graph with the TorchScript
    exporter, and they are a small share of the work) and VAEs that ask for float32 (``force_upcast``,
    SDXL's VAE overflows in fp16)."""
    if comp.name.startswith("text_encoder"):
        return torch.float32
    if comp.name == "vae_decoder" and getattr(comp.module.config, "force_upcast", False):
        return torch.float32
    return precision


LAM_INPUT = "pladis_scale"  # the PLADIS strength, one float32 per denoiser sample (the official pipeline's name)


def _with_lam_input(comp: Component) -> Component:
    """The denoiser contract with lam as its last input: ``pladis_scale`` (cfg_batch,) float32 feeds every
    PLADIS layer through ``patch.using_lam``, so one traced graph serves every lam."""
    from pladis import patch

    inner = comp.forward

    def fwd(m, **inputs):
        with patch.using_lam(m, inputs.pop(LAM_INPUT)):
            return inner(m, **inputs)

    inputs = [*comp.inputs, Port(LAM_INPUT, ("cfg_batch",), "float32", "lam")]
    return Component(comp.name, comp.module, inputs, comp.outputs, fwd, comp.denoiser, comp.extras)


def components(pipe, family: str) -> list[Component]:
    """The components to export for a pipeline of this family: text encoder(s), denoiser, VAE decoder. A
    PLADIS-patched denoiser takes the strength as the input ``pladis_scale``."""
    from pladis import patch

    fam = families.get(family)
    denoiser = fam.contract(fam.component, getattr(pipe, fam.component))
    denoiser.extras["timestep_scale"] = fam.timestep_scale  # sample timesteps over the model's range
    if patch.is_patched(denoiser.module):
        denoiser = _with_lam_input(denoiser)
    return [*(fam.text_encoders or _text_encoders)(pipe), denoiser, (fam.vae_decoder or _vae_decoder)(pipe.vae)]


# --------------------------------------------------------------------------------------------------
# Shapes and sample inputs
# --------------------------------------------------------------------------------------------------


def trace_dims(pipe, family: str, d: dict[str, tuple[int, int, int]]) -> dict[str, tuple[int, int, int]]:
    """Dims to trace at: the smallest image the model takes (two size units a side; tracing runs the model
    once, and a full-size U-Net in fp16 on a CPU computes at a few GFLOP/s), two in every batch (a batch of
    one invites size-1 special cases into the graph), the optimal text length. The graph stays dynamic over
    each declared range all the same; the tests run it at other sizes."""
    unit = size_multiple(pipe, family)
    small = dims(pipe, family, height=2 * unit, width=2 * unit, batch=1, static=True)
    out = {}
    for name, (lo, opt, hi) in d.items():
        size = max(min(2, hi), lo) if "batch" in name else opt if "text" in name else small[name][1]
        out[name] = (lo, size, hi)
    return out


def shape_of(inp: Port, d: dict[str, tuple[int, int, int]], which: int = 1) -> tuple[int, ...]:
    """The concrete shape of ``inp`` at dim setting ``which`` (0 = min, 1 = opt, 2 = max)."""
    return tuple(x if isinstance(x, int) else d[x][which] for x in inp.shape)


def torch_dtype(inp: Port, float_dtype: torch.dtype) -> torch.dtype:
    return float_dtype if inp.dtype == FLOAT else getattr(torch, inp.dtype)


def sample_inputs(
    comp: Component, d: dict, float_dtype: torch.dtype, seed: int = 0, which: int = 1
) -> list[torch.Tensor]:
    """Deterministic sample inputs for ``comp`` with realistic value ranges."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for inp in comp.inputs:
        shape, dtype = shape_of(inp, d, which), torch_dtype(inp, float_dtype)
        if inp.sample == "ids":
            t = torch.randint(0, comp.extras["vocab"], shape, generator=g)
        elif inp.sample == "mask":  # key padding: the last quarter of the tokens is padding in row 0
            t = torch.ones(shape, dtype=torch.int64)
            t[0, shape[-1] - shape[-1] // 4 :] = 0
        elif inp.sample == "timestep":
            t = torch.rand(shape, generator=g) * comp.extras.get("timestep_scale", 1000.0)
        elif inp.sample == "positions":
            t = torch.randint(0, 64, shape, generator=g)
        elif inp.sample == "guidance":
            t = torch.full(shape, 3.5)
        elif inp.sample == "lam":  # a different strength per sample, over the useful range and past it
            t = torch.linspace(0.0, 3.0, shape[0]) if shape[0] > 1 else torch.full(shape, 2.0)
        else:
            t = torch.randn(shape, generator=g)
        out.append(t.to(dtype))
    return out


def dynamic_axes(comp: Component, d: dict) -> dict[str, dict[int, str]]:
    """Axes whose dim has a range (min < max), by input and output name."""
    return {
        t.name: axes
        for t in [*comp.inputs, *comp.outputs]
        if (axes := {i: x for i, x in enumerate(t.shape) if isinstance(x, str) and d[x][0] != d[x][2]})
    }
