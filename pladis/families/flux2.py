"""FLUX.2 family: ``Flux2Transformer2DModel`` (FLUX.2 [dev] and [klein]): MMDiT joint attention over [text,
image] in the double-stream blocks, 2x2-patchified latents packed to tokens, 4-axis rotary position ids, an LLM
text encoder read at three hidden layers, and a VAE whose latents are batch-norm normalised.

Patched: the double-stream blocks' ``Flux2Attention`` (image queries x text keys, as FLUX.1). Left stock: the
single-stream blocks' ``Flux2ParallelSelfAttention``: text and image tokens there are one sequence through one
fused projection (``to_qkv_mlp_proj``, no text projections), so there is no separate text stream to sharpen;
FLUX.1's record makes the same choice for its single-stream blocks.

The sampling loop follows the pipelines: each prompt in the text encoder's own chat template ([klein]:
``Flux2KleinPipeline``'s one user turn, generation prompt, no thinking, hidden states 9, 18, 27 of Qwen3; [dev]:
``Flux2Pipeline``'s system message and user turn, tokenized without added special tokens as its
``apply_chat_template`` call does, hidden states 10, 20, 30 of Mistral-3's language model), stacked along the
features; noise drawn as (B, 4C, h/2, w/2) and packed row-major to tokens; the empirical shift ``mu`` from the
token count and step count; true classifier-free guidance against the empty prompt ([klein]), or the guidance
input where the model embeds it ([dev]). The exported VAE decoder takes the patchified normalised latents and
undoes the batch norm and the 2x2 patches inside its graph. [dev]'s text encoder is exported as its language
model only: the prompts carry no images, so the vision tower and projector never run.
"""

from __future__ import annotations

import torch

from pladis.contracts import Component, Port
from pladis.families.record import LDM, Denoising, Family, Layout, both

COMPONENT = "transformer"
TEXT_LENGTH = 512  # the pipelines' max_sequence_length
# text encoder class -> (the hidden states its pipeline reads (hidden_states_layers), its decoder without the head)
ENCODERS = {
    "Qwen3ForCausalLM": ((9, 18, 27), lambda m: m.model),  # Flux2KleinPipeline
    "Mistral3ForConditionalGeneration": ((10, 20, 30), lambda m: m.model.language_model),  # Flux2Pipeline
}
DEV_PIPELINE = "Flux2Pipeline"  # [dev]: system message, no added special tokens, guidance embedded


def contract(name: str, tr) -> Component:
    cfg = tr.config
    inputs = [
        Port("hidden_states", ("cfg_batch", "image_tokens", cfg.in_channels)),
        Port("encoder_hidden_states", ("cfg_batch", "text", cfg.joint_attention_dim)),
        Port("timestep", ("cfg_batch",), "float32", "timestep"),
        Port("img_ids", ("image_tokens", 4), "float32", "positions"),
        Port("txt_ids", ("text", 4), "float32", "positions"),
    ]
    if cfg.guidance_embeds:
        inputs.append(Port("guidance", ("cfg_batch",), "float32", "guidance"))

    def fwd(m, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, guidance=None):
        return (m(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                  img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0],)  # fmt: skip

    out = Port("out_hidden_states", ("cfg_batch", "image_tokens", cfg.out_channels or cfg.in_channels))
    return Component(name, tr, inputs, [out], fwd, denoiser=True)


def text_encoders(pipe) -> list[Component]:
    """The LLM text encoder without its LM head: token ids and padding mask -> the three hidden states the
    pipeline reads, stacked along the features (B, L, 3 * hidden)."""
    module = pipe.text_encoder
    if type(module).__name__ not in ENCODERS:
        from pladis.errors import PladisError

        raise PladisError(f"FLUX.2 with a {type(module).__name__} text encoder cannot be exported: the FLUX.2 "
                          f"pipelines' encoders are {' and '.join(ENCODERS)}; load the model's own "
                          "text encoder")  # fmt: skip
    layers, decoder = ENCODERS[type(module).__name__]

    def fwd(m, input_ids, attention_mask):
        out = decoder(m)(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                         use_cache=False)  # fmt: skip
        return (torch.cat([out.hidden_states[k] for k in layers], dim=-1),)  # = stack(dim=1).permute.reshape

    inputs = [Port("input_ids", ("batch", "text"), "int64", "ids"),
              Port("attention_mask", ("batch", "text"), "int64", "mask")]  # fmt: skip
    text = decoder(module).config
    outputs = [Port("prompt_embeds", ("batch", "text", text.hidden_size * len(layers)))]
    return [Component("text_encoder", module, inputs, outputs, fwd, extras={"vocab": text.vocab_size})]


def vae_decoder(vae) -> Component:
    """Patchified normalised latents (B, 4C, h/2, w/2) -> images: the batch norm undone, the 2x2 patches
    unfolded, then the decoder (as the pipeline does after its loop)."""

    def fwd(m, latent_sample):
        mean = m.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(m.bn.running_var.view(1, -1, 1, 1) + m.config.batch_norm_eps)
        return (m.decode(unpatchify(latent_sample * std + mean), return_dict=False)[0],)

    c = 4 * vae.config.latent_channels
    return Component("vae_decoder", vae, [Port("latent_sample", ("batch", c, "patch_height", "patch_width"))],
                     [Port("sample", ("batch", vae.config.out_channels, "height", "width"))], fwd)  # fmt: skip


def dims(d: dict) -> dict:
    """image_tokens: one token per 2x2 latent patch; patch_height/width: the patch grid."""
    ph = tuple(h // 2 for h in d["latent_height"])
    pw = tuple(w // 2 for w in d["latent_width"])
    return {"image_tokens": tuple(h * w for h, w in zip(ph, pw, strict=True)), "patch_height": ph,
            "patch_width": pw}  # fmt: skip


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """(B, 4C, h/2, w/2) -> (B, C, h, w), as Flux2Pipeline._unpatchify_latents."""
    b, c, h, w = x.shape
    return x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)


def image_ids(h: int, w: int) -> torch.Tensor:
    """(h*w, 4) float32 position ids (t, row, column, l) = (0, i, j, 0) of the packed patch grid."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1)).float()


def text_ids(length: int) -> torch.Tensor:
    """(length, 4) float32 position ids (0, 0, 0, l) of the text tokens."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length)).float()


def conversation(prompt: str, pipeline: str) -> tuple[list[dict], dict]:
    """(messages, chat-template options) of one prompt as ``pipeline`` formats it."""
    if pipeline == DEV_PIPELINE:
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        return format_input([prompt])[0], {"add_generation_prompt": False}
    return [{"role": "user", "content": prompt}], {"add_generation_prompt": True, "enable_thinking": False}


def encode(d: Denoising, prompts, negatives, height, width, guidance) -> dict:
    """Text states (CFG: the negatives first; klein's negative is the empty prompt), position ids, and the
    guidance input (B,) where the model embeds guidance."""

    def states(p):
        texts = [d.chat("text_encoder", messages, **options) for messages, options in
                 (conversation(x, d.pipeline) for x in p)]  # fmt: skip
        special = d.pipeline != DEV_PIPELINE  # [dev] tokenizes in apply_chat_template: no added special tokens
        return d.text("text_encoder", texts, special_tokens=special)["prompt_embeds"]

    emb = both(states, prompts, negatives)
    lh, lw = d.latent_hw(height, width)
    cond = {"encoder_hidden_states": emb, "txt_ids": text_ids(emb.shape[1]), "img_ids": image_ids(lh // 2, lw // 2)}
    if "guidance" in d.input_names:
        cond["guidance"] = torch.full((emb.shape[0],), float(guidance))
    return cond


def noise_shape(batch: int, channels: int, lh: int, lw: int) -> tuple[int, ...]:
    """The pipeline draws its noise patchified: (B, 4C, h/2, w/2)."""
    return (batch, 4 * channels, lh // 2, lw // 2)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, 4C, h/2, w/2) -> (B, h/2 * w/2, 4C) tokens, row-major (Flux2Pipeline._pack_latents)."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)


def unpack(latents: torch.Tensor, lh: int, lw: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) tokens -> (B, 4C, h/2, w/2), the exported VAE decoder's input."""
    b, _, c = latents.shape
    return latents.permute(0, 2, 1).reshape(b, c, lh // 2, lw // 2)


def set_timesteps(scheduler, steps: int, lh: int, lw: int) -> None:
    """sigmas linspace(1, 1/steps) shifted by the empirical mu of the token count and step count."""
    import numpy as np
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    mu = compute_empirical_mu(image_seq_len=(lh // 2) * (lw // 2), num_steps=steps)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)


def _as_is(latents: torch.Tensor, scaling_factor: float, shift_factor: float | None) -> torch.Tensor:
    return latents  # the exported decoder undoes the normalisation itself


# BFL's single files of the denoiser. They also hold FLUX.1's double_blocks keys: the registry lists this family
# before FLUX.1 so that these (single_stream_modulation: FLUX.2 only, as diffusers tells them apart) match first.
LAYOUTS = (
    Layout("FLUX.2 (model.diffusion_model.single_stream_modulation)",
           (LDM + "single_stream_modulation.lin.weight",), None, COMPONENT, model_types=("flux-2-dev",)),
    Layout("FLUX.2 (single_stream_modulation)", ("single_stream_modulation.lin.weight",), None, COMPONENT,
           model_types=("flux-2-dev",)),
)  # fmt: skip

FAMILY = Family(
    name="flux2", class_name="Flux2Transformer2DModel", component=COMPONENT, joint=True, text_first=True,
    contract=contract, text_length=TEXT_LENGTH, denoiser_multiple=lambda m: 2,  # 2x2 patches
    extra_dims=dims, layouts=LAYOUTS, timestep_scale=1.0, flow_matching=True, default_guidance=4.0, encode=encode,
    pack=pack, unpack=unpack, set_timesteps=set_timesteps, text_encoders=text_encoders, vae_decoder=vae_decoder,
    noise_shape=noise_shape, vae_input=_as_is,
)  # fmt: skip
