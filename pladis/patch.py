"""Patch diffusers models with PLADIS: processors, per-family layer detection, ``apply`` and ``remove``.

Which denoisers are supported, and whether their text attention is joint or cross-attention, is read from
their record in ``pladis.families``. The processors mirror diffusers' stock ones (``AttnProcessor2_0`` for
cross-attention, ``JointAttnProcessor2_0``/``FluxAttnProcessor`` for joint attention, and for joint attention
that rotates and masks its streams apart ``QwenDoubleStreamAttnProcessor2_0``) up to the attention call, which
goes to ``pladis.ops``; they hold no numerics of their own. ``apply`` swaps processors through each attention
module's public ``set_processor`` and remembers the originals; ``remove`` puts them back.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import nn

from pladis import ops
from pladis.errors import PladisError, SettingError
from pladis.families import Family, denoiser_components, supported_models
from pladis.families import of_model as family_of
from pladis.options import LayersConfig

LayerSelection = Union[str, Callable[[str], bool]]

_ORIGINALS = "_pladis_original_processors"


# --------------------------------------------------------------------------------------------------
# Processors
# --------------------------------------------------------------------------------------------------


def _qk_norm(norm: nn.Module | None, x: torch.Tensor, heads: int) -> torch.Tensor:
    """Apply a q/k norm to x: (B, L, heads*D), per head (a norm of size D) or across heads (size heads*D).

    Which one is read off the norm's own size, as the stock processors hard-code it per model class.
    """
    if norm is None:
        return x
    size = getattr(norm, "normalized_shape", None) or getattr(norm, "dim", None)
    if size is None and getattr(norm, "weight", None) is not None:
        size = norm.weight.shape
    size = size[-1] if isinstance(size, (tuple, list, torch.Size)) else size
    if size == x.shape[-1]:
        return norm(x)
    return norm(x.unflatten(-1, (heads, -1))).flatten(-2)


def _strength(proc, batch: int) -> float | torch.Tensor:
    """The lam a processor uses for a call with ``batch`` samples: the per-call value ``using_lam`` set (one per
    sample; a list for half the batch is repeated, as diffusers pipelines stack [uncond, cond]), or the
    number the model was patched with."""
    lam = proc.lam_override
    if lam is None:
        return proc.lam
    if lam.shape[0] not in (1, batch) and batch % lam.shape[0] == 0:
        lam = lam.repeat(batch // lam.shape[0])
    return lam


class CrossAttnProcessor:
    """PLADIS processor for a diffusers ``Attention`` used as cross-attention (U-Net, PixArt)."""

    def __init__(self, lam: float, alpha: float):
        self.lam, self.alpha, self.lam_override = lam, alpha, None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:  # (B, C, H, W) feature map -> (B, H*W, C) tokens
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, key_len = context.shape[0], context.shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        query = _qk_norm(attn.norm_q, attn.to_q(hidden_states), attn.heads)
        key = _qk_norm(attn.norm_k, attn.to_k(context), attn.heads)
        value = attn.to_v(context)
        # (B, L, H*D) -> (B, H, L, D)
        query, key, value = (t.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for t in (query, key, value))
        lam = _strength(self, query.shape[0])
        out = ops.attention(query, key, value, lam=lam, alpha=self.alpha, attn_mask=attention_mask)
        out = out.transpose(1, 2).flatten(2).to(query.dtype)

        out = attn.to_out[1](attn.to_out[0](out))  # linear, dropout
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class JointAttnProcessor:
    """PLADIS processor for MMDiT joint attention (SD3 ``Attention``, FLUX ``FluxAttention``).

    ``text_first``: FLUX orders the joint sequence [text, image], SD3 [image, text].
    """

    def __init__(self, lam: float, alpha: float, text_first: bool):
        self.lam, self.alpha, self.text_first, self.lam_override = lam, alpha, text_first, None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is None:
            raise PladisError("PLADIS joint-attention processor needs encoder_hidden_states (the text tokens)")
        if getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
            eq = attn.add_q_proj(encoder_hidden_states)
            ek = attn.add_k_proj(encoder_hidden_states)
            ev = attn.add_v_proj(encoder_hidden_states)
        # (B, L, H*D) -> (B, L, H, D); the q/k norms act on the last axis
        q, k, v, eq, ek, ev = (t.unflatten(-1, (attn.heads, -1)) for t in (q, k, v, eq, ek, ev))
        q, k = _maybe(attn.norm_q, q), _maybe(attn.norm_k, k)
        eq, ek = _maybe(attn.norm_added_q, eq), _maybe(attn.norm_added_k, ek)

        # The text length is a constant of the graph (int() also under tracing); the image length stays
        # symbolic: the split below only uses n_txt, so exports serve every image size.
        n_txt = int(eq.shape[1])
        first, second = ((eq, ek, ev), (q, k, v)) if self.text_first else ((q, k, v), (eq, ek, ev))
        q, k, v = (torch.cat(pair, dim=1) for pair in zip(first, second, strict=True))
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)

        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, L, H, D) -> (B, H, L, D)
        out = ops.joint_attention(
            q,
            k,
            v,
            text_len=n_txt,
            text_first=self.text_first,
            lam=_strength(self, q.shape[0]),
            alpha=self.alpha,
            attn_mask=attention_mask,
        )
        out = out.transpose(1, 2).flatten(2).to(q.dtype)

        txt, img = (out[:, :n_txt], out[:, n_txt:]) if self.text_first else (out[:, -n_txt:], out[:, :-n_txt])
        img = attn.to_out[1](attn.to_out[0](img.contiguous()))
        if not getattr(attn, "context_pre_only", False) and getattr(attn, "to_add_out", None) is not None:
            txt = attn.to_add_out(txt.contiguous())
        return img, txt


class StreamJointAttnProcessor:
    """PLADIS processor for joint attention over [text, image] that rotates each stream by itself and masks
    text keys by a text padding mask (Qwen-Image's ``QwenDoubleStreamAttnProcessor2_0``): q/k/v of both streams,
    per-head q/k norms, ``rotate(x, freqs)`` per stream (the family record's ``stream_rotary``; freqs an
    (image, text) pair), keys masked by [text mask, image all], then ``ops.joint_attention`` (text first)."""

    def __init__(self, lam: float, alpha: float, rotate: Callable):
        self.lam, self.alpha, self.rotate, self.lam_override = lam, alpha, rotate, None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):  # fmt: skip
        if encoder_hidden_states is None or attention_mask is not None:
            raise PladisError("PLADIS stream joint-attention processor takes the text stream and its padding mask "
                              "(encoder_hidden_states, encoder_hidden_states_mask), not an attention_mask")  # fmt: skip
        mask = None
        if encoder_hidden_states_mask is not None:  # keys: [text (its mask), image (all)]
            image = torch.ones_like(hidden_states[..., 0], dtype=torch.bool)
            mask = torch.cat([encoder_hidden_states_mask.bool(), image], dim=1)[:, None, None, :]
        head_dim = attn.inner_dim // attn.heads
        img = [p(hidden_states).unflatten(-1, (-1, head_dim)) for p in (attn.to_q, attn.to_k, attn.to_v)]
        txt = [p(encoder_hidden_states).unflatten(-1, (-1, head_dim))
               for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]  # fmt: skip
        img[0], img[1] = _maybe(attn.norm_q, img[0]), _maybe(attn.norm_k, img[1])
        txt[0], txt[1] = _maybe(attn.norm_added_q, txt[0]), _maybe(attn.norm_added_k, txt[1])
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img[0], img[1] = self.rotate(img[0], img_freqs), self.rotate(img[1], img_freqs)
            txt[0], txt[1] = self.rotate(txt[0], txt_freqs), self.rotate(txt[1], txt_freqs)
        n_txt = int(txt[0].shape[1])  # a constant of the graph; the image length stays symbolic
        q, k, v = (torch.cat([t, i], dim=1).transpose(1, 2) for t, i in zip(txt, img, strict=True))
        out = ops.joint_attention(q, k, v, text_len=n_txt, text_first=True, lam=_strength(self, q.shape[0]),
                                  alpha=self.alpha, attn_mask=mask)  # fmt: skip
        out = out.transpose(1, 2).flatten(2).to(q.dtype)
        img_out = attn.to_out[0](out[:, n_txt:].contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)  # dropout
        return img_out, attn.to_add_out(out[:, :n_txt].contiguous())


def _maybe(norm: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)


# --------------------------------------------------------------------------------------------------
# Which modules are patched (the family record says joint or cross-attention, and the default exclusions)
# --------------------------------------------------------------------------------------------------


def _is_candidate(module: nn.Module, fam: Family) -> bool:
    """Cross-attention (or, for MMDiT, joint attention with text projections); never self-attention."""
    if not hasattr(module, "set_processor") or not hasattr(module, "to_q"):
        return False
    if fam.joint:
        return getattr(module, "add_k_proj", None) is not None and not getattr(module, "pre_only", False)
    return bool(getattr(module, "is_cross_attention", False))


def select_layers(model: nn.Module, layers: LayerSelection = "default") -> list[str]:
    """Qualified names of the attention modules ``apply`` patches for this ``layers`` choice.

    layers: "default" (the official code's choice: for U-Nets down and up blocks, mid block left out;
    all cross/joint attention elsewhere), "all", or a predicate on qualified module names (applied to the
    cross/joint-attention modules only, so self-attention is never selected).
    """
    fam = family_of(model)
    names = [n for n, m in model.named_modules() if _is_candidate(m, fam)]
    if callable(layers):
        return [n for n in names if layers(n)]
    if layers == "all":
        return names
    if layers == "default":
        return [n for n in names if not (fam.default_excludes and re.search(fam.default_excludes, n))]
    raise SettingError("layers", f'layers must be "default", "all" or a callable on module names; got {layers!r}')


# --------------------------------------------------------------------------------------------------
# apply / remove
# --------------------------------------------------------------------------------------------------


@dataclass
class PatchReport:
    """What ``apply`` did. ``layers``: qualified names of the patched attention modules."""

    model: str
    family: str
    lam: float
    alpha: float
    layers: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        head = f"PLADIS on {self.model} ({self.family}): lam={self.lam}, alpha={self.alpha}, {len(self.layers)} layers"
        width = max([len("layer"), *map(len, self.layers)])
        rows = [f"| {'#':>3} | {'layer':<{width}} |", f"| {'-' * 3} | {'-' * width} |"]
        rows += [f"| {i:>3} | {name:<{width}} |" for i, name in enumerate(self.layers)]
        return "\n".join([head, *rows])


def denoiser_of(target) -> nn.Module:
    """The model to patch: ``target`` itself, or a pipeline's ``unet`` / ``transformer``."""
    if isinstance(target, nn.Module):
        return target
    for attr in denoiser_components():
        model = getattr(target, attr, None)
        if isinstance(model, nn.Module):
            return model
    attrs = " or ".join(f"`{a}`" for a in denoiser_components())
    raise PladisError(
        f"cannot find a denoiser in {type(target).__name__}: pass a diffusers model or a pipeline with a "
        f"{attrs} (supported: {', '.join(supported_models())})"
    )


def apply(
    target, *, lam: float = ops.DEFAULT_LAM, alpha: float = ops.DEFAULT_ALPHA, layers: LayerSelection = "default"
) -> PatchReport:
    """Patch a diffusers model or pipeline with PLADIS; returns the report of patched layers.

    target: a supported diffusers denoiser or a ``DiffusionPipeline`` holding one. lam = 0 patches nothing
    (the model keeps its stock attention path). Applying again first removes the earlier patch.
    Processors that carry weights (IP-Adapter and the like) are refused rather than silently dropped.
    """
    ops.check_params(lam, alpha)
    model = denoiser_of(target)
    fam = family_of(model)
    names = select_layers(model, layers)
    remove(model)
    report = PatchReport(type(model).__name__, fam.name, float(lam), float(alpha))
    if lam == 0:
        return report
    modules = dict(model.named_modules())
    for name in names:
        proc = modules[name].get_processor()
        if isinstance(proc, nn.Module):
            raise PladisError(
                f"{name} uses {type(proc).__name__}, which carries weights (e.g. IP-Adapter); PLADIS replaces "
                "stock attention processors only (patch a model without adapters)"
            )
    originals = {}
    for name in names:
        module = modules[name]
        originals[name] = module.get_processor()
        if fam.stream_rotary is not None:  # joint attention rotating its streams apart, text keys masked
            module.set_processor(StreamJointAttnProcessor(float(lam), float(alpha), fam.stream_rotary))
        elif fam.joint:
            module.set_processor(JointAttnProcessor(float(lam), float(alpha), fam.text_first))
        else:
            module.set_processor(CrossAttnProcessor(float(lam), float(alpha)))
    setattr(model, _ORIGINALS, originals)
    report.layers = names
    return report


@contextlib.contextmanager
def using_lam(target, lam):
    """Run the calls inside the block at PLADIS strength ``lam`` (the official pipeline's ``pladis_scale``).

    target: a model or pipeline patched by ``apply``. lam: a number, or one value per sample (a list or a
    1-D tensor; inside a diffusers pipeline with CFG, one per prompt-image: it is repeated for the doubled
    batch). The model stays traceable: under ``torch.onnx.export`` a tensor lam becomes a graph input.
    """
    model = denoiser_of(target)
    procs = [p for p in _pladis_processors(model)]
    if not procs:
        raise PladisError("this model is not patched with PLADIS (or was patched with lam=0): call "
                         "pladis.apply(model, lam=...) first")  # fmt: skip
    if isinstance(lam, torch.Tensor):
        t = lam.float().flatten()
    else:
        values = [lam] if isinstance(lam, (int, float)) and not isinstance(lam, bool) else list(lam)
        for v in values:
            ops.check_params(v, procs[0].alpha)
        t = torch.tensor(values, dtype=torch.float32)
    if t.numel() == 0:
        raise SettingError("lam", "lam is an empty list: give a number or one value per sample")
    old = [p.lam_override for p in procs]
    for p in procs:
        p.lam_override = t
    try:
        yield
    finally:
        for p, o in zip(procs, old, strict=True):
            p.lam_override = o


def scale(target, lam):
    """Deprecated alias of ``using_lam`` (the name collided with attention's logit ``scale``); works as before."""
    import warnings

    warnings.warn("pladis.scale is deprecated: use pladis.using_lam(pipe, lam)", DeprecationWarning, stacklevel=2)
    return using_lam(target, lam)


def _pladis_processors(model) -> list:
    modules = dict(model.named_modules())
    return [modules[name].get_processor() for name in model.__dict__.get(_ORIGINALS, {})]


def is_patched(target) -> bool:
    """Whether ``apply`` patched at least one layer of the model."""
    return bool(denoiser_of(target).__dict__.get(_ORIGINALS))


def remove(target) -> int:
    """Restore the processors ``apply`` replaced (the same objects, so outputs are bitwise as before).

    Returns the number of layers restored (0 when the model was not patched).
    """
    model = denoiser_of(target)
    originals = model.__dict__.pop(_ORIGINALS, {})
    modules = dict(model.named_modules())
    for name, proc in originals.items():
        modules[name].set_processor(proc)
    return len(originals)


# --------------------------------------------------------------------------------------------------
# `pladis layers`
# --------------------------------------------------------------------------------------------------


def layers(cfg: LayersConfig) -> PatchReport:
    """The patch report for ``cfg.model``; built-ins are built on the meta device (no weights, instant)."""
    from pladis import models

    pipe = models.load(cfg.model, device="meta" if cfg.model in models.BUILTINS else "cpu")
    return apply(pipe, lam=cfg.lam, alpha=cfg.alpha, layers=cfg.layers)
