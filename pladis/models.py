"""Built-in model configs, offline tokenizers and ``load``.

Built-in names build real diffusers architectures from configs with random weights, deterministic by
seed, and need no download: ``tiny-*`` (CPU tests, each denoiser forward well under a second),
``small-sd15`` (SD 1.5's layout with a 92 M-parameter U-Net, for CPU benchmarks) and the full-size
``sd15`` / ``sdxl`` architectures (benchmarks; ``sdxl`` needs about 14 GB of RAM in float32, 7 in fp16).
Anything else is a hub id or a local folder and goes through ``DiffusionPipeline.from_pretrained``.
"""

from __future__ import annotations

import contextlib
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pladis.errors import PladisError

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
_CHARS = string.ascii_lowercase + string.digits + string.punctuation


# --------------------------------------------------------------------------------------------------
# Offline tokenizers: one token per character; real tokenizer objects, saved and loaded like any other
# --------------------------------------------------------------------------------------------------


def char_tokenizer(kind: str, max_length: int):
    """A character-level ``PreTrainedTokenizerFast`` shaped like CLIP's (kind="clip") or T5's ("t5").

    CLIP: ``<|startoftext|> text <|endoftext|>``, padded with ``<|endoftext|>``; T5: ``text </s>``, padded
    with ``<pad>`` (id 0). Lower-cases; unknown characters map to the unknown token.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if kind == "clip":
        specials = [CLIP_BOS, CLIP_EOS]
        unk, pad, bos, eos, template = CLIP_EOS, CLIP_EOS, CLIP_BOS, CLIP_EOS, f"{CLIP_BOS} $A {CLIP_EOS}"
    elif kind == "t5":
        specials = [T5_PAD, T5_EOS, T5_UNK]
        unk, pad, bos, eos, template = T5_UNK, T5_PAD, None, T5_EOS, f"$A {T5_EOS}"
    else:
        raise PladisError(f'tokenizer kind must be "clip" or "t5"; got {kind!r}')
    vocab = {tok: i for i, tok in enumerate([*specials, *_CHARS])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder()
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in specials if t in template]
    )
    kwargs = {"bos_token": bos} if bos else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=max_length, pad_token=pad, eos_token=eos, unk_token=unk, **kwargs
    )


# --------------------------------------------------------------------------------------------------
# Component builders
# --------------------------------------------------------------------------------------------------


def _clip(hidden: int, layers: int, heads: int, inter: int, proj: int, vocab: int, act: str, with_proj: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = char_tokenizer("clip", 77)
    cfg = CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, projection_dim=proj, hidden_act=act, max_position_embeddings=77,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    return (CLIPTextModelWithProjection if with_proj else CLIPTextModel)(cfg), tok


def _t5(d_model: int, layers: int, heads: int, d_ff: int, max_length: int):
    from transformers import T5Config, T5EncoderModel

    tok = char_tokenizer("t5", max_length)
    cfg = T5Config(
        vocab_size=256, d_model=d_model, d_kv=d_model // heads, d_ff=d_ff, num_layers=layers, num_heads=heads,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
    )  # fmt: skip
    return T5EncoderModel(cfg), tok


def _vae(channels: tuple[int, ...], latent: int, groups: int, scaling: float, shift: float | None = None, **kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=channels, latent_channels=latent,
        down_block_types=("DownEncoderBlock2D",) * len(channels), up_block_types=("UpDecoderBlock2D",) * len(channels),
        layers_per_block=kw.pop("layers_per_block", 1), norm_num_groups=groups, scaling_factor=scaling,
        shift_factor=shift, **kw,
    )  # fmt: skip


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _scheduler(name: str, **kw):
    """A diffusers scheduler: on the CPU and in float32 whatever the modules are built in
    (``load`` may build modules on the meta device or directly in half precision)."""
    import diffusers

    with torch.device("cpu"), _default_dtype(torch.float32):
        return getattr(diffusers, name)(**kw)


def _euler():
    return _scheduler("EulerDiscreteScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      steps_offset=1, timestep_spacing="leading")  # fmt: skip


def _flow(**kw):
    return _scheduler("FlowMatchEulerDiscreteScheduler", **kw)


def _sd15(tiny: bool, channels: tuple[int, ...] = (320, 640, 1280, 1280), sample_size: int = 64):
    """SD 1.5: the tiny test model, or the real layout with ``channels`` (full size: the defaults)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    if tiny:
        te, tok = _clip(32, 2, 4, 37, 32, 1000, "quick_gelu", with_proj=False)
        unet = UNet2DConditionModel(
            sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8, norm_num_groups=32,
        )  # fmt: skip
        vae = _vae((32, 64), 4, 32, 0.18215)
    else:
        te, tok = _clip(768, 12, 12, 3072, 768, 49408, "quick_gelu", with_proj=False)
        unet = UNet2DConditionModel(
            sample_size=sample_size, block_out_channels=channels, layers_per_block=2, cross_attention_dim=768,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8,
        )  # fmt: skip
        vae = _vae((128, 256, 512, 512), 4, 32, 0.18215, layers_per_block=2, sample_size=sample_size * 8)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=_euler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def _sdxl(tiny: bool):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    if tiny:
        te, tok = _clip(32, 2, 4, 37, 32, 1000, "gelu", with_proj=False)
        te2, tok2 = _clip(32, 2, 4, 37, 32, 1000, "gelu", with_proj=True)
        unet = UNet2DConditionModel(
            sample_size=16, block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=64,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=80, norm_num_groups=1,
        )  # fmt: skip
        vae = _vae((32, 64), 4, 32, 0.13025)
    else:
        te, tok = _clip(768, 12, 12, 3072, 768, 49408, "quick_gelu", with_proj=False)
        te2, tok2 = _clip(1280, 32, 20, 5120, 1280, 49408, "gelu", with_proj=True)
        unet = UNet2DConditionModel(**sdxl_unet_config())
        vae = _vae((128, 256, 512, 512), 4, 32, 0.13025, layers_per_block=2, sample_size=1024, force_upcast=True)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2, unet=unet, scheduler=_euler()
    )


def sdxl_unet_config() -> dict:
    """The full-size SDXL base U-Net config (2.6 B parameters; 70 cross-attention layers, 10 in the mid block)."""
    return dict(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    )  # fmt: skip


def _pixart():
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

    te, tok = _t5(32, 2, 4, 37, max_length=120)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    )  # fmt: skip
    return PixArtAlphaPipeline(
        tokenizer=tok, text_encoder=te, vae=_vae((32, 64), 4, 32, 0.18215), transformer=transformer,
        scheduler=_scheduler("DPMSolverMultistepScheduler"),
    )  # fmt: skip


def _sd3():
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    te, tok = _clip(32, 2, 4, 37, 32, 1000, "gelu", with_proj=True)
    te2, tok2 = _clip(32, 2, 4, 37, 32, 1000, "gelu", with_proj=True)
    te3, tok3 = _t5(32, 2, 4, 37, max_length=77)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    )  # fmt: skip
    vae = _vae((4,), 4, 1, 1.5035, 0.0609, use_quant_conv=False, use_post_quant_conv=False)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=_flow(shift=3.0), vae=vae, text_encoder=te, tokenizer=tok,
        text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=te3, tokenizer_3=tok3,
    )  # fmt: skip


def _flux():
    from diffusers import FluxPipeline, FluxTransformer2DModel

    te, tok = _clip(32, 2, 4, 37, 32, 1000, "gelu", with_proj=False)
    te2, tok2 = _t5(32, 2, 4, 37, max_length=77)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8), guidance_embeds=True,
    )  # fmt: skip
    vae = _vae((4,), 1, 1, 1.5035, 0.0609, use_quant_conv=False, use_post_quant_conv=False)
    scheduler = _flow(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096)  # fmt: skip
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2,
        transformer=transformer,
    )  # fmt: skip


# Qwen3's chat template for one user message with add_generation_prompt and enable_thinking=False (what
# FLUX.2 [klein] applies to each prompt), for the character tokenizer of the tiny Qwen3
QWEN3_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _qwen3(hidden: int, layers: int, heads: int, inter: int, max_length: int):
    """A Qwen3 causal LM (eager attention: traceable with a padding mask) and a character tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = char_tokenizer("t5", max_length)
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    cfg = Qwen3Config(
        vocab_size=256, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=1, head_dim=hidden // heads, max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
        attn_implementation="eager",
    )  # fmt: skip
    return Qwen3ForCausalLM(cfg), tok


# Mistral-3's chat format for a system message and user turns whose content is a list of text parts (what
# FLUX.2 [dev]'s format_input builds), for the character tokenizer of the tiny Mistral-3
MISTRAL3_CHAT_TEMPLATE = (
    "{{ bos_token or '' }}{% for m in messages %}"
    "{% if m['content'] is string %}{% set text = m['content'] %}"
    "{% else %}{% set text = m['content'] | map(attribute='text') | join('') %}{% endif %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST]{{ text }}[/INST]{% endif %}{% endfor %}"
)


def _mistral3(hidden: int, layers: int, heads: int, inter: int, max_length: int):
    """A Mistral-3 (Pixtral vision tower + Mistral language model; eager attention: traceable with a padding
    mask) and a character tokenizer with Mistral's chat format."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    tok = char_tokenizer("t5", max_length)
    tok.chat_template = MISTRAL3_CHAT_TEMPLATE
    text = MistralConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=1, head_dim=hidden // heads, max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    vision = PixtralVisionConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1, image_size=32,
                                 num_attention_heads=heads, head_dim=hidden // heads, patch_size=16)  # fmt: skip
    cfg = Mistral3Config(text_config=text, vision_config=vision, spatial_merge_size=1, tie_word_embeddings=True,
                         attn_implementation="eager")  # fmt: skip
    return Mistral3ForConditionalGeneration(cfg), tok


def _flux2_vae():
    """AutoencoderKLFlux2 with random batch-norm statistics (the latents' normalisation)."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=4,
        use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    vae.bn.running_mean.normal_(0.0, 0.5)
    vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


def _flux2_transformer(guidance: bool):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * 16, timestep_guidance_channels=32, mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance,
    )  # fmt: skip


def _flux2_scheduler():
    return _flow(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                 max_image_seq_len=4096, shift=3.0)  # fmt: skip


def _flux2_dev():
    """FLUX.2 [dev]'s layout: Mistral-3 text encoder (30 layers: the pipeline reads hidden states 10, 20, 30),
    Flux2Transformer2DModel with guidance embedding (guidance-distilled, no CFG), the FLUX.2 VAE."""
    from diffusers import Flux2Pipeline

    te, tok = _mistral3(16, 30, 2, 32, max_length=512)
    transformer = _flux2_transformer(guidance=True)  # weights drawn in this order: text encoder, transformer, VAE
    return Flux2Pipeline(
        scheduler=_flux2_scheduler(), vae=_flux2_vae(), text_encoder=te, tokenizer=tok, transformer=transformer
    )


def _flux2():
    """FLUX.2 [klein]'s layout: Qwen3 text encoder (27 layers: the pipeline reads hidden states 9, 18, 27),
    Flux2Transformer2DModel without guidance embedding (klein uses CFG), AutoencoderKLFlux2 with random
    batch-norm statistics (the latents' normalisation)."""
    from diffusers import Flux2KleinPipeline

    te, tok = _qwen3(16, 27, 2, 32, max_length=512)
    transformer = _flux2_transformer(guidance=False)  # weights drawn in this order: text encoder, transformer, VAE
    return Flux2KleinPipeline(
        scheduler=_flux2_scheduler(), vae=_flux2_vae(), text_encoder=te, tokenizer=tok, transformer=transformer
    )


def _qwen25_vl(hidden: int, layers: int, heads: int, inter: int, max_length: int):
    """A Qwen2.5-VL model (text decoder with M-RoPE and a one-block vision tower; eager attention: traceable with
    a padding mask) and a character tokenizer (right padding, as the pipeline's masked-hidden extraction reads)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = char_tokenizer("t5", max_length)
    half = hidden // heads // 2  # M-RoPE sections (temporal, height, width) cover half the head dim
    text = dict(
        vocab_size=256, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=1, max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "mrope_section": [half - 2 * (half // 4), half // 4, half // 4],
                         "rope_theta": 1000000.0},
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
    )  # fmt: skip
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=hidden,
                  fullatt_block_indexes=[0])  # fmt: skip
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=252, video_token_id=253,
                           vision_start_token_id=254, vision_end_token_id=255, attn_implementation="eager")  # fmt: skip
    return Qwen2_5_VLForConditionalGeneration(cfg), tok


def _qwenimage():
    """Qwen-Image's layout: a Qwen2.5-VL text encoder (the pipeline reads its last hidden states after the
    prompt template's first 34 tokens), QwenImageTransformer2DModel (joint attention in every block, 3-axis
    rotary), AutoencoderKLQwenImage (a causal 3-D VAE; latents normalised by random per-channel mean/std)."""
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel

    te, tok = _qwen25_vl(16, 2, 2, 32, max_length=2048)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
        latents_mean=(torch.randn(4, generator=g, device="cpu") * 0.5).tolist(),
        latents_std=(torch.rand(4, generator=g, device="cpu") * 1.5 + 0.5).tolist(),
    )  # fmt: skip
    # Qwen-Image's scheduler config
    scheduler = _flow(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                      max_image_seq_len=8192, shift=1.0, shift_terminal=0.02,
                      time_shift_type="exponential")  # fmt: skip
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=te, tokenizer=tok, transformer=transformer)


@dataclass(frozen=True)
class Builtin:
    """A built-in random-weight model: its builder, the image size its tests and demo use, and any extra
    pipeline-call arguments it needs (PixArt's resolution binning only knows the real sample sizes)."""

    build: Callable[[], object]
    height: int
    width: int
    call_kwargs: dict = field(default_factory=dict)


BUILTINS: dict[str, Builtin] = {
    "tiny-sd15": Builtin(lambda: _sd15(tiny=True), 32, 32),
    "tiny-sdxl": Builtin(lambda: _sdxl(tiny=True), 32, 32),
    "tiny-pixart": Builtin(_pixart, 16, 16, {"use_resolution_binning": False}),
    "tiny-sd3": Builtin(_sd3, 16, 16),
    "tiny-flux": Builtin(_flux, 32, 32),
    "tiny-flux2": Builtin(_flux2, 32, 32),
    "tiny-flux2-dev": Builtin(_flux2_dev, 32, 32),
    "tiny-qwenimage": Builtin(_qwenimage, 32, 32),
    # SD 1.5's layout with a 92 M-parameter U-Net at 256²: benchmarks that must take seconds on a CPU
    "small-sd15": Builtin(lambda: _sd15(tiny=False, channels=(128, 256, 384, 384), sample_size=32), 256, 256),
    "sd15": Builtin(lambda: _sd15(tiny=False), 512, 512),
    "sdxl": Builtin(lambda: _sdxl(tiny=False), 1024, 1024),
}


def unknown(name: str) -> str:
    """The message for a model name that is no built-in, no folder and no hub id (``org/name``), with the
    closest built-in names when a typo is likely."""
    import difflib

    close = difflib.get_close_matches(name, BUILTINS, n=2)
    hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
    return (f"unknown model {name!r}{hint}: use a built-in ({', '.join(BUILTINS)}), a diffusers folder, a "
            ".safetensors / .ckpt checkpoint, or a hub id of the form org/name")  # fmt: skip


def _hub_failure(err: Exception) -> str:
    """from_pretrained's reason on one line, without its pointers to a stack trace the user does not see."""
    text = str(err)
    if "not fully cached locally" in text:
        return "it is not in the local Hugging Face cache and the Hub could not be reached"
    text = text.replace("Please check out the root cause in the stacktrace above.", "")
    return " ".join(text.split()).rstrip(". ") or type(err).__name__


def load(name_or_path: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A diffusers pipeline: a built-in name (random weights, deterministic by seed) or a hub id / folder.

    Built-ins are built on the CPU in ``dtype`` under a forked RNG seeded with ``seed`` (the global RNG is
    untouched), then moved to ``device``; ``device="meta"`` builds the structure only (no weights).
    Hub ids and folders go through ``DiffusionPipeline.from_pretrained(name_or_path, dtype=dtype)``.
    """
    if name_or_path in BUILTINS:
        # Modules are created directly in ``dtype``: no float32 copy of a full-size model next to the half
        # one. Random init then draws in that dtype, so weights are deterministic per (seed, dtype).
        with (
            torch.random.fork_rng(devices=[]),
            torch.device("meta" if device == "meta" else "cpu"),
            _default_dtype(dtype if dtype.is_floating_point else torch.float32),
        ):
            torch.manual_seed(seed)
            pipe = BUILTINS[name_or_path].build()
        if device == "meta":  # structure only: no weights, no memory (layer listings, counts)
            return pipe
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.eval()  # from_pretrained does this; freshly built modules start in training mode
        return pipe if device == "cpu" else pipe.to(device)
    if "/" not in name_or_path and not Path(name_or_path).expanduser().is_dir():  # no hub id: never ask the hub
        raise PladisError(unknown(name_or_path))
    import diffusers
    from packaging.version import Version

    # diffusers 0.42 renamed `torch_dtype` to `dtype` (the old name still works there, with a warning)
    dtype_kw = "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()  # "couldn't connect to the Hub, will try the cache": the error below says it once
    try:
        local = {"local_files_only": True} if Path(name_or_path).is_dir() else {}  # a folder never goes to the hub
        pipe = diffusers.DiffusionPipeline.from_pretrained(name_or_path, **{dtype_kw: dtype}, **local)
    except (OSError, ValueError) as err:
        raise PladisError(
            f"cannot load model {name_or_path!r}: not a built-in ({', '.join(BUILTINS)}) and from_pretrained "
            f"failed ({_hub_failure(err)}). Pass a built-in name, a local diffusers folder, or a hub id you can "
            "download."
        ) from None
    finally:
        dlog.set_verbosity(level)
    return pipe.to(device)
