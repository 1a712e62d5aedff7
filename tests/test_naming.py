"""kohya target rules and names on tiny real-architecture modules (full depth, small widths)."""
from __future__ import annotations

import re

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lora_trainer.models.naming import (
    SD_LAYOUT,
    SDXL_LAYOUT,
    compvis_to_diffusers_unet,
    diffusers_to_compvis_unet,
    find_unet_targets,
    open_clip_to_transformers_path,
    te_targets,
    transformers_to_open_clip_path,
    unet_targets,
)


def tiny_sd1_unet(cross_dim: int = 16) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64, 96, 96), norm_num_groups=32, layers_per_block=2,
        cross_attention_dim=cross_dim, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )


def tiny_sdxl_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16, 24), norm_num_groups=4, layers_per_block=2,
        cross_attention_dim=24, attention_head_dim=(1, 2, 2), transformer_layers_per_block=(1, 2, 10),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 * 4 + 16,
    )


def tiny_clip(layers: int, with_projection: bool = False):
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=8, intermediate_size=16, num_hidden_layers=layers,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=16)
    return CLIPTextModelWithProjection(cfg) if with_projection else CLIPTextModel(cfg)


def tiny_ldm_unet(cross_dim: int = 16):
    from lora_trainer.testing.ldm_shims import install_ldm_shims

    if not install_ldm_shims():
        pytest.skip("Stability's `ldm` package is not importable (install stable-diffusion-sdkit)")
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    return UNetModel(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
                     num_res_blocks=2, channel_mult=[1, 2, 3, 3], num_head_channels=16, use_spatial_transformer=True,
                     transformer_depth=1, context_dim=cross_dim, legacy=False)


# --- the WebUI's rule (extensions-builtin/Lora/networks.py, convert_diffusers_name_to_compvis), re-implemented ---
_WEBUI_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                 "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def webui_to_compvis(key: str) -> str:
    def suffix(kind, rest):
        return _WEBUI_RESNET.get(rest, rest) if kind == "resnets" else rest

    if m := re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"diffusion_model_input_blocks_{1 + b * 3 + i}_{1 if kind == 'attentions' else 0}_{suffix(kind, rest)}"
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        kind, i, rest = m[1], int(m[2]), m[3]
        return f"diffusion_model_middle_block_{1 if kind == 'attentions' else i * 2}_{suffix(kind, rest)}"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"diffusion_model_output_blocks_{b * 3 + i}_{1 if kind == 'attentions' else 0}_{suffix(kind, rest)}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key):
        return f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key):
        b = int(m[1])
        return f"diffusion_model_output_blocks_{2 + b * 3}_{2 if b > 0 else 1}_conv"
    if m := re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key):
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    return key


def webui_layer_mapping(diffusion_model, text_model) -> dict[str, torch.nn.Module]:
    """The WebUI's `network_layer_mapping` for an SD1 model (its transformers wraps CLIP in `.text_model`)."""
    mapping = {"diffusion_model_" + n.replace(".", "_"): m for n, m in diffusion_model.named_modules() if n}
    for n, m in text_model.named_modules():
        if n:
            path = n if n.startswith("text_model.") else "text_model." + n
            mapping["transformer_" + path.replace(".", "_")] = m
    return mapping


def test_sd1_counts_and_names():
    unet_names = unet_targets(tiny_sd1_unet(), "sd1", "diffusers")
    te_names = te_targets(tiny_clip(12), "lora_te_")
    assert len(unet_names) == 192
    assert len(te_names) == 72
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in unet_names
    assert "lora_unet_up_blocks_3_attentions_2_proj_out" in unet_names
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj" in unet_names
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in te_names
    assert "lora_te_text_model_encoder_layers_11_mlp_fc2" in te_names
    conv_names = unet_targets(tiny_sd1_unet(), "sd1", "diffusers", include_conv=True)
    assert len(conv_names) == 278  # kohya LoCon on SD1: + 22 resnets x 3, 14 shortcuts, 3 down + 3 upsamplers
    extra = set(conv_names) - set(unet_names)
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in extra
    assert "lora_unet_down_blocks_0_downsamplers_0_conv" in extra
    assert "lora_unet_up_blocks_0_upsamplers_0_conv" in extra
    assert not any("conv_in" in n or "time_embedding" in n for n in conv_names)


def test_text_encoder_attention_named_after_its_kernel_is_a_target():
    # transformers 4.36-4.47 (the version Forge pins) build CLIP attention as `CLIPSdpaAttention`; a LoRA that
    # missed it would train only the MLPs of the text encoder (24 modules instead of kohya's 72)
    clip = tiny_clip(12)
    for name, module in clip.named_modules():
        if name.endswith("self_attn"):  # `text_model.` prefix or not, by transformers version
            module.__class__ = type("CLIPSdpaAttention", (type(module),), {})
    names = te_targets(clip, "lora_te_")
    assert len(names) == 72
    assert "lora_te_text_model_encoder_layers_11_self_attn_out_proj" in names


def test_sdxl_counts_and_compvis_names():
    unet_names = unet_targets(tiny_sdxl_unet(), "sdxl", "diffusers")
    te1 = te_targets(tiny_clip(12), "lora_te1_")
    te2 = te_targets(tiny_clip(32, with_projection=True), "lora_te2_")
    assert (len(unet_names), len(te1), len(te2)) == (722, 72, 192)
    assert len(unet_targets(tiny_sdxl_unet(), "sdxl", "diffusers", include_conv=True)) == 788
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in unet_names
    assert "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2" in unet_names
    assert "lora_unet_output_blocks_5_1_proj_out" in unet_names
    assert "lora_te2_text_model_encoder_layers_31_self_attn_out_proj" in te2
    assert not any("text_projection" in n for n in te2)


def test_webui_rule_maps_every_sd1_name_onto_an_ldm_module():
    ldm_unet = tiny_ldm_unet()
    text_model = tiny_clip(12)
    mapping = webui_layer_mapping(ldm_unet, text_model)
    names = unet_targets(tiny_sd1_unet(), "sd1", "diffusers", include_conv=True)
    names.update(te_targets(text_model, "lora_te_"))
    for name, module in names.items():
        target = mapping.get(webui_to_compvis(name))
        assert target is not None, f"{name} -> {webui_to_compvis(name)} is not an ldm module"
        assert type(target) is type(module) or type(target).__name__ == type(module).__name__
        assert tuple(target.weight.shape) == tuple(module.weight.shape), name


def test_both_trees_give_the_same_sd1_names():
    diffusers_names = unet_targets(tiny_sd1_unet(), "sd1", "diffusers", include_conv=True)
    ldm_names = unet_targets(tiny_ldm_unet(), "sd1", "compvis", include_conv=True)
    assert set(diffusers_names) == set(ldm_names)
    for name, module in diffusers_names.items():
        assert ldm_names[name].weight.shape == module.weight.shape, name


@pytest.mark.parametrize("build,layout", [(tiny_sd1_unet, SD_LAYOUT), (tiny_sdxl_unet, SDXL_LAYOUT)])
def test_path_mapping_round_trips_through_diffusers_own_converter(build, layout):
    unet = build()
    state = unet.state_dict()
    original = {}
    for key, value in state.items():
        module_path, param = key.rsplit(".", 1)
        compvis = diffusers_to_compvis_unet(module_path, layout)
        assert compvis_to_diffusers_unet(compvis, layout) == module_path
        original[f"model.diffusion_model.{compvis}.{param}"] = value
    back = convert_ldm_unet_checkpoint(original, dict(unet.config))
    assert set(back) == set(state)
    assert all(back[k] is state[k] or torch.equal(back[k], state[k]) for k in state)


def test_targets_are_linear_or_1x1_conv_without_conv_flag():
    for module in find_unet_targets(tiny_sd1_unet()).values():
        assert isinstance(module, torch.nn.Linear) or tuple(module.kernel_size) == (1, 1)


def test_open_clip_paths():
    assert open_clip_to_transformers_path("model.transformer.resblocks.3.mlp.c_fc") == \
        "text_model.encoder.layers.3.mlp.fc1"
    assert open_clip_to_transformers_path("transformer.resblocks.0.attn") == "text_model.encoder.layers.0.self_attn"
    assert transformers_to_open_clip_path("text_model.encoder.layers.7.mlp.fc2") == "transformer.resblocks.7.mlp.c_proj"
    with pytest.raises(ValueError, match="resblocks"):
        open_clip_to_transformers_path("token_embedding")


def test_open_clip_resblocks_get_four_attention_names():
    from torch import nn

    class ResidualAttentionBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)
            self.mlp = nn.Sequential()
            self.mlp.add_module("c_fc", nn.Linear(8, 16))
            self.mlp.add_module("c_proj", nn.Linear(16, 8))

    tower = nn.Module()
    tower.transformer = nn.Module()
    tower.transformer.resblocks = nn.ModuleList([ResidualAttentionBlock() for _ in range(3)])
    names = te_targets(tower, "lora_te_", max_layers=2)
    assert len(names) == 12
    block = tower.transformer.resblocks[1]
    for part in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert names[f"lora_te_text_model_encoder_layers_1_self_attn_{part}"] is block.attn
    assert names["lora_te_text_model_encoder_layers_1_mlp_fc2"] is block.mlp.c_proj


def test_unknown_paths_raise_with_a_hint():
    with pytest.raises(ValueError, match="diffusion_model"):
        compvis_to_diffusers_unet("cond_stage_model.transformer")
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        diffusers_to_compvis_unet("text_model.encoder")


@pytest.mark.parametrize("arch,unet,unet_conv,te", [
    ("sd1", 192, 278, [72]), ("sd2", 192, 278, [138]), ("sdxl", 722, 788, [72, 192]),
])
def test_full_size_shipped_configs_give_kohyas_module_counts(arch, unet, unet_conv, te):
    import json

    from lora_trainer.models.configs import config_dir

    folder = config_dir(arch)

    def config(sub):
        return json.loads((folder / sub / "config.json").read_text(encoding="utf-8"))

    with torch.device("meta"):  # real sizes, no memory
        model = UNet2DConditionModel.from_config(config("unet"))
        encoders = [CLIPTextModel(CLIPTextConfig(**config("text_encoder")))]
        if arch == "sdxl":
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**config("text_encoder_2"))))
    assert len(unet_targets(model, arch, "diffusers")) == unet
    assert len(unet_targets(model, arch, "diffusers", include_conv=True)) == unet_conv
    assert [len(te_targets(e, "lora_te_")) for e in encoders] == te
