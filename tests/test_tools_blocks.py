"""Block layouts, slots of full-size SD1/SDXL LoRA names, vectors and presets."""
from __future__ import annotations

import re

import pytest

from lora_trainer.models.naming import SD_LAYOUT, diffusers_to_compvis_unet
from lora_trainer.tools import architecture_modules, expand_vector, is_named_unblocked, parse_vector, slot_of, slots
from lora_trainer.tools.blocks import SD_SLOTS, UNBLOCKED
from lora_trainer.tools.presets import BUILTIN_PRESETS, load_presets, resolve_weights, webui_preset_file


def _lbw_slot(compvis_name: str) -> str:
    """LoRA Block Weight's rule, written independently: substring match on the WebUI name, last hit wins."""
    patterns = ["encoder"] + [f"diffusion_model_input_blocks_{i}_" for i in range(12)] + \
        ["diffusion_model_middle_block_"] + [f"diffusion_model_output_blocks_{i}_" for i in range(12)]
    slot = UNBLOCKED
    for index, pattern in enumerate(patterns):
        if pattern in compvis_name:
            slot = SD_SLOTS[index]
    return slot


def _webui_name(name: str, arch: str) -> str:
    if name.startswith("lora_te"):
        return name
    path = name.removeprefix("lora_unet_")
    if arch != "sdxl":
        match = re.match(r"(down_blocks|up_blocks|mid_block)_?(\d+)?_?(attentions|resnets|downsamplers|upsamplers)"
                         r"_(\d+)_(.*)", path)
        if match:
            head = ".".join(g for g in match.groups()[:4] if g)
            path = diffusers_to_compvis_unet(head, SD_LAYOUT).replace(".", "_") + "_" + match.group(5)
        elif path.startswith("conv_in"):
            path = "input_blocks_0_0"
    return "diffusion_model_" + path


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_every_full_size_lora_and_locon_name_lands_in_one_slot_as_lbw_assigns_it(arch):
    table = architecture_modules(arch)
    assert len(table.lora_targets) == {"sd1": 264, "sdxl": 986}[arch]
    assert len(table.locon_targets) == {"sd1": 350, "sdxl": 1052}[arch]
    names = sorted(table.locon_targets) + ["lora_unet_conv_in" if arch == "sd1" else "lora_unet_input_blocks_0_0"]
    seen = set()
    for name in names:
        slot = slot_of(name)
        assert slot in slots(arch), name
        assert slot == _lbw_slot(_webui_name(name, arch)), name
        seen.add(slot)
    assert seen == set(slots(arch))  # a LoCon of the full model fills every slot


@pytest.mark.parametrize("name", ["lora_unet_time_embedding_linear_1", "lora_unet_conv_out", "lora_unet_time_embed_0",
                                  "lora_unet_label_emb_0_0", "lora_unet_out_2", "lora_unet_add_embedding_linear_2"])
def test_modules_lbw_leaves_at_one_are_named_unblocked(name):
    assert is_named_unblocked(name) and slot_of(name) == UNBLOCKED
    assert expand_vector([0] * 26, "sd1").weight(name) == 1.0


def test_sd1_and_sdxl_examples():
    assert slot_of("lora_te_text_model_encoder_layers_0_mlp_fc1") == "BASE"
    assert slot_of("lora_te2_text_model_encoder_layers_5_self_attn_q_proj.lora_up.weight") == "BASE"
    assert slot_of("lora_unet_down_blocks_0_downsamplers_0_conv") == "IN03"
    assert slot_of("lora_unet_down_blocks_3_resnets_1_conv2") == "IN11"
    assert slot_of("lora_unet_up_blocks_1_upsamplers_0_conv") == "OUT05"
    assert slot_of("lora_unet_mid_block_attentions_0_proj_in") == "M00"
    assert slot_of("lora_unet_output_blocks_8_0_in_layers_2") == "OUT08"


def test_short_vectors_fill_missing_slots_with_zero_like_lbw():
    weights = expand_vector(BUILTIN_PRESETS["OUTD"], "sd1")
    assert weights.weights["OUT03"] == 1 and weights.weights["OUT09"] == 0 and weights.weights["BASE"] == 1
    assert weights.zero_filled == ("IN00", "IN03", "IN06", "IN09", "IN10", "IN11", "OUT00", "OUT01", "OUT02")
    xl = expand_vector([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], "sdxl")
    assert xl.weights["IN04"] == 2 and xl.weights["OUT05"] == 12 and xl.weights["IN00"] == 0


@pytest.mark.parametrize("arch,length,fits", [("sdxl", 17, "12 or 20"), ("sdxl", 26, "12 or 20"),
                                              ("sd1", 12, "17 or 26"), ("sd2", 20, "17 or 26"), ("sd1", 5, "17")])
def test_a_length_that_does_not_fit_is_an_error_naming_the_lengths_that_do(arch, length, fits):
    with pytest.raises(ValueError, match=fits):
        expand_vector([1] * length, arch)


def test_vector_parsing_refuses_non_numbers():
    assert parse_vector("1, 0,0.5") == [1.0, 0.0, 0.5]
    with pytest.raises(ValueError, match="item 2 .*'R'"):
        parse_vector("1,R,0")


def test_preset_files_and_the_webui_lbw_file(tmp_path):
    lbw = tmp_path / "webui" / "extensions" / "sd-webui-lora-block-weight" / "scripts" / "lbwpresets.txt"
    lbw.parent.mkdir(parents=True)
    lbw.write_text("# comment\nMINE:" + ",".join(["0.5"] * 12) + "\nRAND:" + ",".join(["R"] * 17) +
                   "\nFLUX:" + ",".join(["1"] * 61) + "\nBAD:1,2,3\n", encoding="utf-8")
    own = tmp_path / "mine.txt"
    own.write_text("MINE:" + ",".join(["0.25"] * 12) + "\n", encoding="utf-8")
    assert webui_preset_file(tmp_path / "webui") == lbw
    book = load_presets([own], tmp_path / "webui")
    assert book.vector("MINE") == (0.25,) * 12  # our file wins over the WebUI's
    assert resolve_weights("mine", "sdxl", book).weights["IN04"] == 0.25
    assert resolve_weights("OUTALL", "sd1", book).weights["OUT11"] == 1
    with pytest.raises(ValueError, match="not a number"):
        book.vector("RAND")
    with pytest.raises(ValueError, match="3 values"):
        book.vector("BAD")
    with pytest.raises(ValueError, match="unknown"):
        resolve_weights("NOPE", "sd1", book)
    with pytest.raises(ValueError, match="12 or 20"):
        resolve_weights("OUTD", "sdxl", book)  # a 17-value SD1 preset on SDXL is never remapped
