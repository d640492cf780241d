"""SD3 family: Stable Diffusion 3/3.5 (MMDiT joint attention over [image, text], CLIP-L + CLIP-G + T5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pladis.contracts import Component, Port
from pladis.families.record import CLIP_LENGTH, LDM, Denoising, Family, Layout, both, clip, t5

COMPONENT = "transformer"


def contract(name: str, tr) -> Component:
    cfg = tr.config
    inputs = [
        Port("hidden_states", ("cfg_batch", cfg.in_channels, "latent_height", "latent_width")),
        Port("encoder_hidden_states", ("cfg_batch", "text", cfg.joint_attention_dim)),
        Port("pooled_projections", ("cfg_batch", cfg.pooled_projection_dim)),
        Port("timestep", ("cfg_batch",), "float32", "timestep"),
    ]

    def fwd(m, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        return (m(hidden_states, encoder_hidden_states, pooled_projections, timestep, return_dict=False)[0],)

    out = Port("out_hidden_states", ("cfg_batch", cfg.out_channels, "latent_height", "latent_width"))
    return Component(name, tr, inputs, [out], fwd, denoiser=True)


def encode(d: Denoising, prompts, negatives, height, width, guidance) -> dict:
    """Both CLIPs' penultimate states padded to T5's width, then T5's states along the sequence; the
    pooled embeddings of both CLIPs concatenated."""

    def sd3(p):
        o1, o2 = clip(d, "text_encoder", p), clip(d, "text_encoder_2", p)
        states, _ = t5(d, "text_encoder_3", p)
        pen = torch.cat([o1["penultimate_hidden_state"], o2["penultimate_hidden_state"]], -1)
        pen = F.pad(pen, (0, states.shape[-1] - pen.shape[-1]))  # as diffusers: pad (or cut) to T5's width
        return torch.cat([pen, states], dim=-2), torch.cat([o1["text_embeds"], o2["text_embeds"]], -1)

    states, pooled = both(sd3, prompts, negatives)
    return {"encoder_hidden_states": states, "pooled_projections": pooled}


LAYOUTS = (
    Layout("SD3 MMDiT (model.diffusion_model.joint_blocks.*)",
           (LDM + "joint_blocks.0.context_block.adaLN_modulation.1.bias",), None, COMPONENT),
    Layout("SD3 MMDiT (joint_blocks.*)", ("joint_blocks.0.context_block.adaLN_modulation.1.bias",), None,
           COMPONENT),
)  # fmt: skip

FAMILY = Family(
    name="sd3", class_name="SD3Transformer2DModel", component=COMPONENT, joint=True, text_first=False,
    contract=contract, text_length=CLIP_LENGTH + 256, t5_length=256, denoiser_multiple=lambda m: 1,
    layouts=LAYOUTS, flow_matching=True, default_guidance=7.0, encode=encode,
)  # fmt: skip
