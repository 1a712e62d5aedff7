"""A stand-in for OpenCLIP's text tower (open_clip itself needs torchvision, which has no CPU build here).

Same module names and weights layout as `open_clip`'s text transformer, so an ldm/sgm OpenCLIP embedder can hold
it and the kohya names of its fused attention are the real ones.
"""
from __future__ import annotations

import torch


class ResidualAttentionBlock(torch.nn.Module):
    """OpenCLIP's text resblock (open_clip itself needs torchvision, absent here): same names and math."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(width)
        self.attn = torch.nn.MultiheadAttention(width, heads)
        self.ln_2 = torch.nn.LayerNorm(width)
        self.mlp = torch.nn.Sequential()
        self.mlp.add_module("c_fc", torch.nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", torch.nn.GELU())
        self.mlp.add_module("c_proj", torch.nn.Linear(4 * width, width))

    def forward(self, x, attn_mask=None):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


def open_clip_tower(state: dict, prefix: str = "cond_stage_model.model.") -> torch.nn.Module:
    """An OpenCLIP text tower shaped like the checkpoint's, holding its weights."""
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    width = own["ln_final.weight"].shape[0]
    layers = 1 + max(int(k.split(".")[2]) for k in own if k.startswith("transformer.resblocks."))
    tower = torch.nn.Module()
    tower.token_embedding = torch.nn.Embedding(*own["token_embedding.weight"].shape)
    tower.positional_embedding = torch.nn.Parameter(torch.empty(77, width))
    tower.transformer = torch.nn.Module()
    tower.transformer.resblocks = torch.nn.ModuleList(ResidualAttentionBlock(width, 4) for _ in range(layers))
    tower.ln_final = torch.nn.LayerNorm(width)
    tower.text_projection = torch.nn.Parameter(torch.empty(width, width))
    tower.logit_scale = torch.nn.Parameter(torch.empty(()))
    tower.register_buffer("attn_mask", torch.full((77, 77), float("-inf")).triu(1), persistent=False)
    if own:
        tower.load_state_dict(own, strict=True)
    return tower.eval()


def build_ldm_sd2(tiny_sd2):
    """Stability's ldm LatentDiffusion for a tiny SD2 checkpoint, its OpenCLIP embedder holding the stand-in tower.

    Args:
        tiny_sd2 (TinyModel): from `build_tiny_model("sd2", ...)`.

    Returns:
        LatentDiffusion | None: the model, or None when Stability's `ldm` package is not importable.
    """
    from safetensors.torch import load_file

    from lora_trainer.testing.ldm_shims import build_ldm_model, install_ldm_shims

    if not install_ldm_shims():
        return None
    embedder = torch.nn.Module()  # ldm FrozenOpenCLIPEmbedder's layout: .model (the tower), .layer_idx
    embedder.model = open_clip_tower(load_file(str(tiny_sd2.checkpoint)))
    embedder.layer_idx = 1
    return build_ldm_model(tiny_sd2.yaml, tiny_sd2.checkpoint, cond_stage=embedder)
