"""U-Net family: SD 1.x/2.x, SDXL and its distilled variants (dedicated cross-attention, CLIP text)."""

from __future__ import annotations

import torch

from pladis.contracts import Component, Port
from pladis.families.record import CLIP_LENGTH, LDM, Denoising, Family, Layout, both, clip

COMPONENT = "unet"


def contract(name: str, unet) -> Component:
    cfg = unet.config
    inputs = [
        Port("sample", ("cfg_batch", cfg.in_channels, "latent_height", "latent_width")),
        Port("timestep", ("cfg_batch",), "float32", "timestep"),
        Port("encoder_hidden_states", ("cfg_batch", "text", cfg.cross_attention_dim)),
    ]
    sdxl = cfg.addition_embed_type == "text_time"
    if sdxl:
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs += [
            Port("text_embeds", ("cfg_batch", pooled)),
            Port("time_ids", ("cfg_batch", 6), sample="positions"),
        ]

    def fwd(m, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if sdxl else None
        return (m(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0],)

    out = Port("out_sample", ("cfg_batch", cfg.out_channels, "latent_height", "latent_width"))
    return Component(name, unet, inputs, [out], fwd, denoiser=True)


def encode(d: Denoising, prompts, negatives, height, width, guidance) -> dict:
    """SD 1.x/2.x: the CLIP's last states. SDXL: both CLIPs' penultimate states, the second's pooled
    embedding and the size ids (B, 6)."""
    if "text_embeds" not in d.input_names:  # SD 1.x/2.x
        return {"encoder_hidden_states": both(lambda p: clip(d, "text_encoder", p)["last_hidden_state"],
                                              prompts, negatives)}  # fmt: skip

    def sdxl(p):
        o1, o2 = clip(d, "text_encoder", p), clip(d, "text_encoder_2", p)
        return torch.cat([o1["penultimate_hidden_state"], o2["penultimate_hidden_state"]], -1), o2["text_embeds"]

    states, pooled = sdxl(prompts)
    if negatives is not None:
        if all(not n for n in negatives):  # SDXL's force_zeros_for_empty_prompt
            neg_states, neg_pooled = torch.zeros_like(states), torch.zeros_like(pooled)
        else:
            neg_states, neg_pooled = sdxl(negatives)
        states, pooled = torch.cat([neg_states, states]), torch.cat([neg_pooled, pooled])
    ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(len(states), 1)
    return {"encoder_hidden_states": states, "text_embeds": pooled, "time_ids": ids}


LAYOUTS = (
    Layout("SDXL base (LDM U-Net + conditioner.embedders CLIP-L/OpenCLIP-G)",
           (LDM + "input_blocks.0.0.weight", "conditioner.embedders.1.model.positional_embedding"),
           "StableDiffusionXLPipeline", COMPONENT, ("tiny-sdxl",),
           model_types=("xl_base", "xl_inpaint", "playground-v2-5")),
    Layout("SD 1.x/2.x (LDM U-Net + cond_stage_model text encoder)", (LDM + "input_blocks.0.0.weight",),
           "StableDiffusionPipeline", COMPONENT, ("tiny-sd15", "small-sd15"), any_prefix="cond_stage_model.",
           model_types=("v1", "v2", "inpainting", "inpainting_v2")),
    Layout("LDM U-Net only (model.diffusion_model.*)", (LDM + "input_blocks.0.0.weight",), None, COMPONENT),
)  # fmt: skip

FAMILY = Family(
    name="unet", class_name="UNet2DConditionModel", component=COMPONENT, joint=False,
    default_excludes=r"^mid_block\.", contract=contract, text_length=CLIP_LENGTH,
    denoiser_multiple=lambda m: 2 ** (len(m.config.block_out_channels) - 1),  # its down-sampling levels
    layouts=LAYOUTS, sample_input="sample", default_guidance=7.5, encode=encode,
)  # fmt: skip
