"""Qwen-Image family: ``QwenImageTransformer2DModel`` (``QwenImagePipeline``): MMDiT joint attention over [text,
image] in every block, 2x2-packed latents, a 3-axis rotary embedding built from the image's patch grid and the
text length, the Qwen2.5-VL text encoder's last hidden states after the prompt template, and a causal 3-D VAE
whose latents are normalised by a per-channel mean and standard deviation.

Patched: every block's ``attn`` (image queries x text keys, as FLUX.1); Qwen-Image has no single-stream blocks.
The stock processor (``QwenDoubleStreamAttnProcessor2_0``) builds the joint key mask from the text padding mask
and rotates the text and image streams separately (as complex numbers): the record's ``stream_rotary`` (``rotate``)
makes ``pladis.patch`` use its ``StreamJointAttnProcessor``, which mirrors that up to the attention call.

Export. The rotary is size-dependent (diffusers builds it from ``img_shapes`` and the text length inside the
forward): the exported denoiser takes position ids instead, ``img_ids`` (image_tokens, 3) and ``txt_ids``
(text, 3), as FLUX does, and turns them into the same angles (``position x theta^(-2j/d)`` per axis, float32) in
the graph; diffusers' complex-number rotation becomes its real-arithmetic equal (``rotate`` takes either).
Layers PLADIS leaves stock rotate through ``rotate`` too (``given_rotary``), for the same reason.
The text encoder is exported as the pipeline runs it, without the LM head (its last hidden states); the
pipeline's template handling (drop the first 34 tokens of the real ones, pad with zeros) runs in ``encode``.
The text is padded to a static ``TEXT_LENGTH`` with its mask, where the pipeline pads to the longest prompt: the
image stream is the same (padded keys are masked out), prompts longer than ``TEXT_LENGTH`` tokens are cut.
The VAE decoder takes the unpacked latents (B, C, h, w) and undoes the normalisation inside its graph.

Sampling follows ``QwenImagePipeline``: sigmas linspace(1, 1/n) shifted by ``mu`` from the token count (the
scheduler's dynamic shifting), timesteps / 1000, true classifier-free guidance rescaled to the conditional
prediction's norm per token.
"""

from __future__ import annotations

import contextlib

import torch

from pladis.contracts import Component, Port
from pladis.errors import PladisError
from pladis.families.flux import pack, unpack  # the same 2x2 patch packing (QwenImagePipeline._pack_latents)
from pladis.families.record import Denoising, Family, Layout

COMPONENT = "transformer"
TEXT_LENGTH = 512  # text tokens after the template: static (the joint node's text_len); the pipeline allows 1024
# QwenImagePipeline.prompt_template_encode and prompt_template_encode_start_idx (tests check them against it)
TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
            "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")  # fmt: skip
TEMPLATE_DROP = 34  # hidden states of the template's system part, dropped
THETA = 10000  # QwenEmbedRope's theta
_DIFFUSERS_ROTARY = None  # diffusers' apply_rotary_emb_qwen, set on first use (import cost: torch only)


# --------------------------------------------------------------------------------------------------
# The rotary embedding in real numbers
# --------------------------------------------------------------------------------------------------


def rotary(ids: torch.Tensor, axes_dim: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids (L, 3) float32 -> (cos, sin), each (L, D/2) float32: per axis ``a`` of ``axes_dim[a]`` dims,
    the angles ``ids[:, a] * theta^(-2j/d)`` (QwenEmbedRope.rope_params' float32 product), axes concatenated."""
    angles = []
    for a, d in enumerate(axes_dim):
        inv = 1.0 / torch.pow(THETA, torch.arange(0, d, 2, dtype=torch.float32).div(d))
        angles.append(ids[:, a : a + 1] * inv[None, :])
    theta = torch.cat(angles, dim=-1)
    return theta.cos(), theta.sin()


def rotate(x: torch.Tensor, freqs, use_real: bool = False) -> torch.Tensor:
    """x (B, L, H, D) rotated by ``freqs``: diffusers' complex (L, D/2) (eager: diffusers' own
    ``apply_rotary_emb_qwen``), or a real (cos, sin) pair (exported graphs: the same rotation of each consecutive
    pair (x[2j], x[2j+1]) in real arithmetic). ``use_real``: as diffusers' signature; complex freqs only."""
    if isinstance(freqs, torch.Tensor):
        _diffusers_module()
        return _DIFFUSERS_ROTARY(x, freqs, use_real=use_real)
    cos, sin = (f[None, :, None, :] for f in freqs)
    pairs = x.float().unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(3).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Export contracts
# --------------------------------------------------------------------------------------------------


def _diffusers_module():
    from diffusers.models.transformers import transformer_qwenimage

    global _DIFFUSERS_ROTARY
    if _DIFFUSERS_ROTARY is None:
        _DIFFUSERS_ROTARY = transformer_qwenimage.apply_rotary_emb_qwen
    return transformer_qwenimage


@contextlib.contextmanager
def given_rotary(model, rotary_emb):
    """Inside the block, ``model``'s forward uses ``rotary_emb`` (a real (cos, sin) pair per stream) instead of
    building its rotary from ``img_shapes``. The PLADIS processors rotate through the record's ``rotate``; so do
    the layers PLADIS left stock: diffusers' ``apply_rotary_emb_qwen``, which their processor calls, is ``rotate``
    for the block (complex freqs still go to diffusers' own function; the stock rotation does not export)."""
    module = _diffusers_module()
    pos = model.pos_embed
    pos.forward = lambda *args, **kwargs: rotary_emb
    module.apply_rotary_emb_qwen = rotate
    try:
        yield
    finally:
        module.apply_rotary_emb_qwen = _DIFFUSERS_ROTARY
        del pos.forward


def _check_variant(cfg) -> None:
    for key in ("zero_cond_t", "use_additional_t_cond", "use_layer3d_rope", "guidance_embeds"):
        if getattr(cfg, key, False):
            raise PladisError(f"a QwenImageTransformer2DModel with {key}=True (an edit or layered variant) has no "
                              "export contract here: only the text-to-image QwenImagePipeline's transformer "
                              "exports (the PLADIS processors do not depend on these settings)")  # fmt: skip


def contract(name: str, tr) -> Component:
    cfg = tr.config
    _check_variant(cfg)
    axes = tuple(cfg.axes_dims_rope)
    inputs = [
        Port("hidden_states", ("cfg_batch", "image_tokens", cfg.in_channels)),
        Port("encoder_hidden_states", ("cfg_batch", "text", cfg.joint_attention_dim)),
        Port("encoder_hidden_states_mask", ("cfg_batch", "text"), "int64", "mask"),
        Port("timestep", ("cfg_batch",), "float32", "timestep"),
        Port("img_ids", ("image_tokens", 3), "float32", "positions"),
        Port("txt_ids", ("text", 3), "float32", "positions"),
    ]

    def fwd(m, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep, img_ids, txt_ids):
        with given_rotary(m, (rotary(img_ids, axes), rotary(txt_ids, axes))):
            return (m(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                      encoder_hidden_states_mask=encoder_hidden_states_mask, timestep=timestep, img_shapes=None,
                      return_dict=False)[0],)  # fmt: skip

    out = Port("out_hidden_states", ("cfg_batch", "image_tokens", cfg.patch_size**2 * (cfg.out_channels or 1)))
    return Component(name, tr, inputs, [out], fwd, denoiser=True)


def text_encoders(pipe) -> list[Component]:
    """Qwen2.5-VL's text decoder (``model.language_model``: no LM head, no vision tower, which text prompts never
    reach): token ids of the templated prompt and its padding mask -> the last hidden states (what the pipeline
    reads; the template's first tokens are dropped in ``encode``). The pipeline calls the whole model; for text
    alone that runs the decoder on the same embeddings with the same (arange) positions."""
    template = (getattr(pipe, "prompt_template_encode", TEMPLATE), getattr(pipe, "prompt_template_encode_start_idx",
                                                                            TEMPLATE_DROP))  # fmt: skip
    if template != (TEMPLATE, TEMPLATE_DROP):
        raise PladisError(f"{type(pipe).__name__} encodes prompts with another template (it drops {template[1]} "
                          f"tokens); the Qwen-Image export contract is QwenImagePipeline's (text to image, "
                          f"{TEMPLATE_DROP} dropped): export a QwenImagePipeline")  # fmt: skip
    module = pipe.text_encoder.model.language_model

    def fwd(m, input_ids, attention_mask):
        out = m(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
        return (out.hidden_states[-1],)

    inputs = [Port("input_ids", ("batch", "template_text"), "int64", "ids"),
              Port("attention_mask", ("batch", "template_text"), "int64", "mask")]  # fmt: skip
    hidden = module.config.hidden_size
    outputs = [Port("last_hidden_state", ("batch", "template_text", hidden))]
    vocab = module.config.vocab_size
    return [Component("text_encoder", module, inputs, outputs, fwd, extras={"vocab": vocab})]


def _single_head_attention(block):
    """``QwenImageAttentionBlock.forward`` with its ``squeeze(1)`` of the single head written ``[:, 0]``: the
    same tensor, but the exporter cannot size that dim (the reshape before it is dynamic) and would emit an
    ``If`` that the export's clean-up (``onnx_op.drop_dynamic_squeeze``) takes for a never-1 dim."""
    import torch.nn.functional as F

    def forward(x):
        identity = x
        b, c, t, h, w = x.size()
        x = block.norm(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        qkv = block.to_qkv(x).reshape(b * t, 1, c * 3, -1).permute(0, 1, 3, 2).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)
        x = F.scaled_dot_product_attention(q, k, v)
        x = block.proj(x[:, 0].permute(0, 2, 1).reshape(b * t, c, h, w))
        return x.view(b, t, c, h, w).permute(0, 2, 1, 3, 4) + identity

    return forward


@contextlib.contextmanager
def exportable_vae(vae):
    """Inside the block the VAE's attention blocks run ``_single_head_attention`` (the same numbers)."""
    blocks = [m for m in vae.modules() if type(m).__name__ == "QwenImageAttentionBlock"]
    for m in blocks:
        m.forward = _single_head_attention(m)
    try:
        yield
    finally:
        for m in blocks:
            del m.forward


def vae_decoder(vae) -> Component:
    """Normalised latents (B, C, h, w) -> images (B, 3, H, W): ``latents / (1 / std) + mean`` (the pipeline's
    expression), one frame for the 3-D decoder, the frame axis dropped again."""

    def fwd(m, latent_sample):
        c = m.config.z_dim
        mean = torch.tensor(m.config.latents_mean).view(1, c, 1, 1).to(latent_sample.dtype)
        inv_std = 1.0 / torch.tensor(m.config.latents_std).view(1, c, 1, 1).to(latent_sample.dtype)
        z = (latent_sample / inv_std + mean).unsqueeze(2)
        with exportable_vae(m):
            return (m.decode(z, return_dict=False)[0][:, :, 0],)

    c = vae.config.z_dim
    return Component("vae_decoder", vae, [Port("latent_sample", ("batch", c, "latent_height", "latent_width"))],
                     [Port("sample", ("batch", 3, "height", "width"))], fwd)  # fmt: skip


def dims(d: dict) -> dict:
    """image_tokens: one token per 2x2 latent patch; template_text: the text plus the template's dropped part."""
    tokens = zip(d["latent_height"], d["latent_width"], strict=True)
    length = TEXT_LENGTH + TEMPLATE_DROP
    return {"image_tokens": tuple((h // 2) * (w // 2) for h, w in tokens), "template_text": (length,) * 3}


# --------------------------------------------------------------------------------------------------
# Sampling hooks
# --------------------------------------------------------------------------------------------------


def image_ids(h: int, w: int) -> torch.Tensor:
    """(h*w, 3) float32 position ids (frame, row, column) of the packed h x w patch grid, centred as
    QwenEmbedRope(scale_rope=True) indexes its tables: rows -(h - h//2) .. h//2 - 1, columns alike."""
    rows = torch.arange(h) - (h - h // 2)
    cols = torch.arange(w) - (w - w // 2)
    return torch.cartesian_prod(torch.zeros(1, dtype=torch.long), rows, cols).float()


def text_ids(length: int, h: int, w: int) -> torch.Tensor:
    """(length, 3) float32: text token l sits at max(h//2, w//2) + l on every axis (QwenEmbedRope's txt_freqs)."""
    return (torch.arange(length) + max(h // 2, w // 2)).float()[:, None].expand(length, 3).contiguous()


def prompt_embeds(hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Last hidden states (B, L, D) of the templated prompts and their mask (B, L) -> (embeds (B, TEXT_LENGTH, D),
    mask (B, TEXT_LENGTH) int64): each prompt's real tokens without the template's first ``TEMPLATE_DROP``, zero
    padded (QwenImagePipeline._get_qwen_prompt_embeds, padded to the static length)."""
    rows = [h[m.bool()][TEMPLATE_DROP:][:TEXT_LENGTH] for h, m in zip(hidden, mask, strict=True)]
    emb = hidden.new_zeros(len(rows), TEXT_LENGTH, hidden.shape[-1])
    out_mask = torch.zeros(len(rows), TEXT_LENGTH, dtype=torch.int64)
    for i, r in enumerate(rows):
        emb[i, : len(r)] = r
        out_mask[i, : len(r)] = 1
    return emb, out_mask


def encode(d: Denoising, prompts, negatives, height, width, guidance) -> dict:
    """Text states and masks (CFG: the negatives first), and the rotary position ids of text and image."""

    def states(p):
        out = d.text("text_encoder", [TEMPLATE.format(x) for x in p])
        return prompt_embeds(out["last_hidden_state"], out["attention_mask"])

    emb, mask = states(prompts if negatives is None else negatives + prompts)
    lh, lw = d.latent_hw(height, width)
    h, w = lh // 2, lw // 2
    return {"encoder_hidden_states": emb, "encoder_hidden_states_mask": mask, "img_ids": image_ids(h, w),
            "txt_ids": text_ids(emb.shape[1], h, w)}  # fmt: skip


def set_timesteps(scheduler, steps: int, lh: int, lw: int) -> None:
    """sigmas linspace(1, 1/steps) with the shift ``mu`` of the token count (QwenImagePipeline.__call__)."""
    import numpy as np
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    c = scheduler.config
    mu = calculate_shift((lh // 2) * (lw // 2), c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                         c.get("base_shift", 0.5), c.get("max_shift", 1.15))  # fmt: skip
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)


def guide(uncond: torch.Tensor, text: torch.Tensor, guidance: float) -> torch.Tensor:
    """True CFG, then rescaled to the conditional prediction's norm over each token's channels (the pipeline's)."""
    comb = uncond + guidance * (text - uncond)
    return comb * (torch.norm(text, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))


def _as_is(latents: torch.Tensor, scaling_factor: float, shift_factor: float | None) -> torch.Tensor:
    return latents  # the exported decoder undoes the normalisation itself


def vae_scale(vae_config) -> int:
    """2 ** (temporal down-sampling levels): the pipeline's vae_scale_factor (8 for Qwen-Image's VAE)."""
    return 2 ** len(vae_config.temperal_downsample)


# Single files of the transformer in diffusers' own key layout (ComfyUI's split files; diffusers' loader for this
# class maps keys as they are, so the "model.diffusion_model." prefix is not taken). img_mod and txt_norm: no
# other family's keys (Qwen-Image 2.1's txt_in.text_norm is another class).
LAYOUTS = (
    Layout("Qwen-Image (transformer_blocks.*.img_mod, txt_norm)", ("transformer_blocks.0.img_mod.1.weight",
           "txt_norm.weight"), None, COMPONENT),
)  # fmt: skip

FAMILY = Family(
    name="qwenimage", class_name="QwenImageTransformer2DModel", component=COMPONENT, joint=True, text_first=True,
    stream_rotary=rotate, contract=contract, text_length=TEXT_LENGTH, denoiser_multiple=lambda m: m.config.patch_size,
    extra_dims=dims, layouts=LAYOUTS, timestep_scale=1.0, flow_matching=True, default_guidance=4.0, encode=encode,
    pack=pack, unpack=unpack, set_timesteps=set_timesteps, guide=guide, text_encoders=text_encoders,
    vae_decoder=vae_decoder, vae_scale=vae_scale, vae_input=_as_is, vae_channels=lambda cfg: cfg.z_dim,
    default_side=1024,
)  # fmt: skip
