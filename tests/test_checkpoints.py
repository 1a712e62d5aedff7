"""Checkpoint reading, architecture detection, hashing, the offline tokenizer and the converters at full size."""
from __future__ import annotations

import argparse
import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from lora_trainer.errors import ModelLoadError
from lora_trainer.models.checkpoint import (
    checkpoint_hash,
    detect_architecture,
    read_state_dict,
)
from lora_trainer.models.configs import TOKENIZERS, config_dir, write_config_dir
from lora_trainer.models.tokenizer import (
    BPE_FILE_NAME,
    find_bpe_file,
    write_clip_tokenizer,
)
from lora_trainer.testing import full_size_original_state_dict

# --- tokenizer ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_tokenizers(tmp_path_factory):
    from transformers import CLIPTokenizer

    root = tmp_path_factory.mktemp("tok")
    clip_l = CLIPTokenizer.from_pretrained(write_clip_tokenizer(root / "l"))
    open_clip = CLIPTokenizer.from_pretrained(write_clip_tokenizer(root / "g", pad_token="!"))
    return clip_l, open_clip, root


@pytest.mark.parametrize(
    "text, ids",
    [
        # Reference ids of OpenAI CLIP's tokenizer.
        ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407]),
        ("A Photo of a CAT", [49406, 320, 1125, 539, 320, 2368, 49407]),
        ("hello world", [49406, 3306, 1002, 49407]),
        ("1girl, solo", [49406, 272, 1611, 267, 5797, 49407]),
    ],
)
def test_tokenizer_gives_openai_clip_ids(clip_tokenizers, text, ids):
    clip_l, open_clip, _ = clip_tokenizers
    assert clip_l(text).input_ids == ids
    assert open_clip(text).input_ids == ids


def test_tokenizer_matches_open_clip_reference(clip_tokenizers):
    """OpenCLIP's own SimpleTokenizer (loaded from its file: importing open_clip needs torchvision)."""
    import importlib.util

    pytest.importorskip("ftfy")
    pytest.importorskip("regex")
    spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", find_bpe_file().parent / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reference = module.SimpleTokenizer()
    clip_l, _, _ = clip_tokenizers
    for text in ["masterpiece, best quality, (blue sky:1.2)", "café 日本 émoji 🙂", "<lora:x:0.8> 2girls"]:
        assert clip_l(text).input_ids == [49406, *reference.encode(text), 49407], text


def test_tokenizer_vocab_specials_and_padding(clip_tokenizers):
    clip_l, open_clip, _ = clip_tokenizers
    assert len(clip_l) == 49408 and clip_l.model_max_length == 77
    assert clip_l.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>", "!"]) == [49406, 49407, 0]
    assert clip_l("cat", padding="max_length", max_length=6).input_ids == [49406, 2368, 49407, 49407, 49407, 49407]
    assert open_clip("cat", padding="max_length", max_length=6).input_ids == [49406, 2368, 49407, 0, 0, 0]
    long = clip_l("cat " * 100, truncation=True).input_ids
    assert len(long) == 77 and long[-1] == 49407


def test_tokenizer_sources(clip_tokenizers, tmp_path):
    _, _, root = clip_tokenizers
    from_file = write_clip_tokenizer(tmp_path / "a", source=find_bpe_file())
    from_folder = write_clip_tokenizer(tmp_path / "b", pad_token="!", source=root / "l")
    for name in ("vocab.json", "merges.txt"):
        assert (from_file / name).read_bytes() == (root / "l" / name).read_bytes()
        assert (from_folder / name).read_bytes() == (root / "l" / name).read_bytes()
    assert json.loads((from_folder / "special_tokens_map.json").read_text())["pad_token"] == "!"
    assert find_bpe_file().name == BPE_FILE_NAME
    with pytest.raises(ModelLoadError, match="vocab.json"):
        write_clip_tokenizer(tmp_path / "c", source=tmp_path / "a" / "..")
    with pytest.raises(ValueError, match="pad_token"):
        write_clip_tokenizer(tmp_path / "d", pad_token="<pad>", source=root / "l")


# --- read_state_dict / detect_architecture / hash ------------------------------------------------------------------


def _fake_checkpoint(arch: str) -> dict[str, torch.Tensor]:
    """Signature keys only (enough for detection)."""
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}
    te = {
        "sd1": "cond_stage_model.transformer.text_model.final_layer_norm.weight",
        "sd2": "cond_stage_model.model.transformer.resblocks.0.ln_1.weight",
        "sdxl": "conditioner.embedders.1.model.transformer.resblocks.0.ln_1.weight",
    }[arch]
    sd[te] = torch.ones(4)
    return sd


def test_read_safetensors_and_plain_pickles(tmp_path):
    sd = {"a.weight": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2])}
    save_file(sd, str(tmp_path / "m.safetensors"))
    torch.save({"state_dict": sd, "global_step": 7, "epoch": 1}, tmp_path / "m.ckpt")
    torch.save(sd, tmp_path / "m.pt")
    for name in ("m.safetensors", "m.ckpt", "m.pt"):
        got = read_state_dict(tmp_path / name)
        assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd), name


def test_pickle_with_objects_is_refused(tmp_path):
    path = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hparams": argparse.Namespace(lr=1)}, path)
    with pytest.raises(ModelLoadError, match="unsafe.ckpt") as info:
        read_state_dict(path)
    assert "safetensors" in str(info.value)


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        read_state_dict(tmp_path / "missing.safetensors")
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="model.onnx.*safetensors"):
        read_state_dict(tmp_path / "model.onnx")
    (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ModelLoadError, match="broken.safetensors"):
        read_state_dict(tmp_path / "broken.safetensors")


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_detect_architecture_by_signature(arch):
    sd = _fake_checkpoint(arch)
    assert detect_architecture(sd) == arch
    assert detect_architecture(sd, v_parameterization=True) == ("sd2-v" if arch == "sd2" else arch)


def test_detect_architecture_by_context_dim_without_text_encoder():
    sd = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 1024),
    }
    assert detect_architecture(sd) == "sd2"


@pytest.mark.parametrize(
    "sd, message",
    [
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(1)}, "LoRA"),
        ({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}, "diffusers-format UNet"),
        ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 9, 3, 3)}, "inpainting"),
        ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}, "unknown UNet layout"),
        (
            {
                "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
                "conditioner.embedders.0.model.ln_final.weight": torch.zeros(1),
            },
            "refiner",
        ),
    ],
)
def test_detect_architecture_refuses_with_file_name(sd, message):
    with pytest.raises(ModelLoadError, match=message) as info:
        detect_architecture(sd, source="some/model.safetensors")
    assert "some/model.safetensors" in str(info.value) and "SDXL" in str(info.value)


def test_checkpoint_hash_matches_webui_definition(tmp_path):
    data = bytes(range(256)) * 5000  # > 1 MiB + 64 KiB, so the legacy window is full
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    got = checkpoint_hash(path, block_size=4096)
    assert got.sha256 == hashlib.sha256(data).hexdigest()
    assert got.shorthash == got.sha256[:10]
    assert got.legacy == hashlib.sha256(data[0x100000 : 0x110000]).hexdigest()[:8]


# --- full-size configs and converters (meta device: no memory, real shapes) ----------------------------------------


@pytest.fixture(scope="module")
def full_size():
    return {arch: full_size_original_state_dict(arch) for arch in ("sd1", "sd2", "sdxl")}


# Keys and shapes of the released files (v1-5-pruned, v2-1_768, sd_xl_base_1.0), incl. diffusers' signature keys.
REAL_KEYS = {
    "sd1": {
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    },
    "sd2": {
        "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
        "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
        "cond_stage_model.model.text_projection": (1024, 1024),
        "cond_stage_model.model.positional_embedding": (77, 1024),
        "cond_stage_model.model.logit_scale": (),
    },
    "sdxl": {
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
    },
}
REAL_KEY_COUNTS = {"sdxl": 2515}  # sd_xl_base_1.0.safetensors


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_full_size_conversion_gives_the_released_layout(full_size, arch):
    sd = full_size[arch]
    for key, shape in REAL_KEYS[arch].items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    if arch in REAL_KEY_COUNTS:
        assert len(sd) == REAL_KEY_COUNTS[arch]
    assert detect_architecture(sd) == arch


def test_write_config_dir_adds_tokenizers(tmp_path):
    out = write_config_dir("sdxl", tmp_path / "cfg")
    assert (out / "unet" / "config.json").is_file() and (out / "text_encoder_2" / "config.json").is_file()
    pads = [json.loads((out / sub / "special_tokens_map.json").read_text())["pad_token"] for sub in TOKENIZERS["sdxl"]]
    assert pads == ["<|endoftext|>", "!"]
    assert not list(config_dir("sdxl").rglob("vocab.json")), "tokenizer files must not be shipped"
    with pytest.raises(ValueError, match="sd3"):
        config_dir("sd3")


def test_converters_refuse_foreign_keys_and_short_encoders():
    from lora_trainer.models.convert import (
        open_clip_diffusers_to_original,
        unet_diffusers_to_original,
    )

    unet = {
        "down_blocks.0.resnets.0.conv1.weight": torch.zeros(1),
        "up_blocks.0.resnets.0.conv1.weight": torch.zeros(1),
        "lora_unet_x.lora_down.weight": torch.zeros(1),
    }
    with pytest.raises(ModelLoadError, match="lora_unet_x"):
        unet_diffusers_to_original(unet, "sd1")
    with pytest.raises(ValueError, match="sd3"):
        unet_diffusers_to_original(unet, "sd3")
    te = {"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(1)}
    with pytest.raises(ModelLoadError, match="num_hidden_layers=24"):
        open_clip_diffusers_to_original(te, "cond_stage_model.model.", n_layers=24)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_component_by_component_loading_gives_the_pipelines_weights(arch, request):
    """The loader reads one component of the file at a time; the weights must be those of diffusers' own
    whole-file pipeline loader, tensor for tensor."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from lora_trainer.models.checkpoint import SafetensorsFile, read_state_dict
    from lora_trainer.models.loading import load_checkpoint_adapter

    tiny = request.getfixturevalue(f"tiny_{arch}")
    lazy, whole = SafetensorsFile(tiny.checkpoint), read_state_dict(tiny.checkpoint)
    assert sorted(lazy) == sorted(whole)
    unet_part = lazy.subset(("model.diffusion_model.",))
    assert unet_part and all(torch.equal(t, whole[k]) for k, t in unet_part.items())

    adapter = load_checkpoint_adapter(tiny.checkpoint, config_dir=tiny.config_dir, tokenizer_dir=tiny.tokenizer_dir)
    pipeline_cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    pipe = pipeline_cls.from_single_file(str(tiny.checkpoint), config=str(tiny.config_dir), local_files_only=True)
    expected = [pipe.unet, pipe.vae, pipe.text_encoder] + ([pipe.text_encoder_2] if arch == "sdxl" else [])
    for ours, theirs in zip([adapter.unet(), adapter.vae(), *adapter.text_encoders()], expected, strict=True):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), type(ours).__name__
