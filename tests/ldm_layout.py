"""Writers of the original single-file layouts: LDM (A1111 / ComfyUI) for SD 1.x and SDXL, MMDiT for SD3.

The inverse of diffusers' single-file conversion (``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``,
``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``), written for any block layout so the
tiny models can be saved as one checkpoint the way a training run or a model hub ships it. Test helper only.
"""

import re

import torch

UNET, VAE = "model.diffusion_model.", "first_stage_model."
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET[head]}.{tail}"


def unet_to_ldm(sd: dict, config) -> dict:
    """diffusers UNet2DConditionModel state dict -> LDM ``model.diffusion_model.*`` keys."""
    lpb = config["layers_per_block"]
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip
    has_attn = {int(m.group(1)) for k in sd if (m := re.match(r"up_blocks\.(\d+)\.attentions", k))}
    out = {}
    for key, value in sd.items():
        module, _, param = key.rpartition(".")
        if module in fixed:
            new = f"{fixed[module]}.{param}"
        elif m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
            n = 1 + b * (lpb + 1) + i
            new = f"input_blocks.{n}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{n}.1.{rest}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"input_blocks.{1 + int(m[1]) * (lpb + 1) + lpb}.0.op.{m[2]}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
            n = b * (lpb + 1) + i
            new = f"output_blocks.{n}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{n}.1.{rest}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            b = int(m[1])
            new = f"output_blocks.{b * (lpb + 1) + lpb}.{2 if b in has_attn else 1}.conv.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            new = f"middle_block.1.{m[1]}"
        else:
            raise KeyError(f"no LDM name for U-Net key {key}")
        out[UNET + new] = value
    return out


def vae_to_ldm(sd: dict, config) -> dict:
    """diffusers AutoencoderKL state dict -> LDM ``first_stage_model.*`` keys (attention as 1x1 convs)."""
    n_up = len(config["up_block_types"])
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in sd.items():
        new = key.replace("conv_norm_out", "norm_out")
        if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", key):
            new = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
            if value.ndim == 2:
                value = value[:, :, None, None]
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(.*)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key):
            new = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(.*)", key):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
            new = f"decoder.up.{n_up - 1 - int(m[1])}.upsample.{m[2]}"
        out[VAE + new.replace("conv_shortcut", "nin_shortcut")] = value
    return out


def clip_to_ldm(sd: dict, prefix: str) -> dict:
    """transformers CLIPTextModel state dict -> ``<prefix>text_model.*`` (the HF layout under a prefix)."""
    return {prefix + (k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in sd.items()}


def open_clip_to_ldm(sd: dict, prefix: str = "conditioner.embedders.1.model.") -> dict:
    """transformers CLIPTextModelWithProjection state dict -> OpenCLIP keys (fused in_proj, transposed projection)."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = {
        "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": sd.pop("final_layer_norm.weight"),
        "ln_final.bias": sd.pop("final_layer_norm.bias"),
        "text_projection": sd.pop("text_projection.weight").T.contiguous(),
    }
    sd.pop("embeddings.position_ids", None)
    layers = sorted({int(m[1]) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{p}"] = torch.cat([sd.pop(f"{src}self_attn.{x}_proj.{p}") for x in "qkv"])
            out[f"{dst}attn.out_proj.{p}"] = sd.pop(f"{src}self_attn.out_proj.{p}")
            for a, b in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                         ("mlp.fc2", "mlp.c_proj")):  # fmt: skip
                out[f"{dst}{b}.{p}"] = sd.pop(f"{src}{a}.{p}")
    if sd:
        raise KeyError(f"no OpenCLIP name for {sorted(sd)[:3]}")
    return {prefix + k: v for k, v in out.items()}


def pipeline_to_ldm(pipe) -> dict:
    """One original-layout state dict for an SD 1.x (StableDiffusionPipeline) or SDXL pipeline."""
    out = unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config)
    out |= vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config)
    if getattr(pipe, "text_encoder_2", None) is not None:
        out |= clip_to_ldm(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer.")
        out |= open_clip_to_ldm(pipe.text_encoder_2.state_dict())
    else:
        out |= clip_to_ldm(pipe.text_encoder.state_dict(), "cond_stage_model.transformer.")
    return {k: v.detach().contiguous() for k, v in out.items()}


def _swap_halves(w: torch.Tensor) -> torch.Tensor:
    """diffusers' swap_scale_shift: (shift, scale) <-> (scale, shift); its own inverse."""
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def sd3_to_original(sd: dict, prefix: str = "model.diffusion_model.") -> dict:
    """diffusers SD3Transformer2DModel state dict -> the original MMDiT layout (``joint_blocks.*``), the inverse
    of diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``."""
    sd = dict(sd)
    n = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    fixed = {"pos_embed.pos_embed": "pos_embed", "pos_embed.proj": "x_embedder.proj",
             "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
             "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
             "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
             "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "context_embedder": "context_embedder",
             "proj_out": "final_layer.linear"}  # fmt: skip
    out = {}
    for new, old in fixed.items():
        for p in ("weight", "bias", ""):
            key = f"{new}.{p}" if p else new
            if key in sd and (p or new == "pos_embed.pos_embed"):
                out[f"{old}.{p}" if p else old] = sd.pop(key)
    for p in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{p}"] = _swap_halves(sd.pop(f"norm_out.linear.{p}"))
        for i in range(n):
            t, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
            out[f"{x}attn.qkv.{p}"] = torch.cat([sd.pop(f"{t}attn.to_{q}.{p}") for q in "qkv"])
            out[f"{c}attn.qkv.{p}"] = torch.cat([sd.pop(f"{t}attn.add_{q}_proj.{p}") for q in "qkv"])
            pairs = [("attn.to_out.0", f"{x}attn.proj"), ("norm1.linear", f"{x}adaLN_modulation.1"),
                     ("ff.net.0.proj", f"{x}mlp.fc1"), ("ff.net.2", f"{x}mlp.fc2"),
                     ("attn.to_add_out", f"{c}attn.proj"), ("ff_context.net.0.proj", f"{c}mlp.fc1"),
                     ("ff_context.net.2", f"{c}mlp.fc2")]  # fmt: skip
            for src, dst in pairs:
                if f"{t}{src}.{p}" in sd:
                    out[f"{dst}.{p}"] = sd.pop(f"{t}{src}.{p}")
            ctx = sd.pop(f"{t}norm1_context.linear.{p}")
            out[f"{c}adaLN_modulation.1.{p}"] = _swap_halves(ctx) if i == n - 1 else ctx
    qk_norms = (("norm_q", "x_block.attn.ln_q"), ("norm_k", "x_block.attn.ln_k"),
                ("norm_added_q", "context_block.attn.ln_q"), ("norm_added_k", "context_block.attn.ln_k"))  # fmt: skip
    for i in range(n):  # qk norms (weights only), when the model has them
        for src, dst in qk_norms:
            if f"transformer_blocks.{i}.attn.{src}.weight" in sd:
                out[f"joint_blocks.{i}.{dst}.weight"] = sd.pop(f"transformer_blocks.{i}.attn.{src}.weight")
    if sd:
        raise KeyError(f"no original SD3 name for {sorted(sd)[:3]}")
    return {prefix + k: v.detach().contiguous() for k, v in out.items()}
