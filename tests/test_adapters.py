"""Model adapters on tiny real-architecture checkpoints: loading, encoding, prediction, targets, checkpointing."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from diffusers import DDPMScheduler

from lora_trainer.errors import ModelLoadError
from lora_trainer.models.adapter import ModelAdapter, TextConditioning
from lora_trainer.models.text_encoding import encode_clip, tokenize_chunks
from lora_trainer.testing.open_clip_tower import open_clip_tower

CAPTIONS = ["a photo of a cat, masterpiece", "1girl, solo, long hair, " * 12]


@pytest.fixture(scope="module")
def sd1(tiny_sd1):
    from lora_trainer.models.loading import load_checkpoint_adapter

    return load_checkpoint_adapter(tiny_sd1.checkpoint, config_dir=tiny_sd1.config_dir)


@pytest.fixture(scope="module")
def sd2(tiny_sd2):
    from lora_trainer.models.loading import load_checkpoint_adapter

    return load_checkpoint_adapter(tiny_sd2.checkpoint, v_parameterization=True, config_dir=tiny_sd2.config_dir)


@pytest.fixture(scope="module")
def ldm_sd1(tiny_sd1):
    from lora_trainer.models.ldm_adapter import LdmAdapter
    from lora_trainer.testing.ldm_shims import build_ldm_model, install_ldm_shims

    if not install_ldm_shims():
        pytest.skip("Stability's `ldm` package is not importable (install stable-diffusion-sdkit)")
    return LdmAdapter(build_ldm_model(tiny_sd1.yaml, tiny_sd1.checkpoint))


def test_tokenize_chunks_layout(sd1):
    tok = sd1.tokenizers[0]
    ids = tokenize_chunks(tok, ["a cat", ""], 150)
    assert ids.shape == (2, 2, 77)
    assert (ids[:, :, 0] == tok.bos_token_id).all()
    n = len(tok("a cat", add_special_tokens=False)["input_ids"])
    assert ids[0, 0, n + 1] == tok.eos_token_id and (ids[0, 0, n + 2:] == tok.pad_token_id).all()
    assert ids[1, 0, 1] == tok.eos_token_id and ids[0, 1, 1] == tok.eos_token_id
    long = tokenize_chunks(tok, [CAPTIONS[1]], 150)
    words = tok(CAPTIONS[1], add_special_tokens=False)["input_ids"]
    assert long[0, 1, 1:1 + len(words) - 75].tolist() == words[75:150]
    with pytest.raises(ValueError, match="max_token_length"):
        tokenize_chunks(tok, ["x"], 100)


def test_sd1_caption_encoding_matches_transformers_and_chunks_independently(sd1):
    te = sd1.text_encoders()[0]
    with torch.no_grad():
        cond = sd1.encode_captions(CAPTIONS[:1])
        ids = tokenize_chunks(sd1.tokenizers[0], CAPTIONS[:1], 75)[:, 0]
        assert torch.allclose(cond.crossattn, te(input_ids=ids).last_hidden_state, atol=1e-6)
        two = sd1.encode_captions(CAPTIONS, max_token_length=150)
        assert two.crossattn.shape == (2, 154, te.config.hidden_size) and two.pooled is None
        assert torch.allclose(two.crossattn[:1, :77], cond.crossattn, atol=1e-5)
        skip2 = sd1.encode_captions(CAPTIONS[:1], clip_skip=2)
        hidden = te(input_ids=ids, output_hidden_states=True).hidden_states[-2]
        assert torch.allclose(skip2.crossattn, te.final_layer_norm(hidden), atol=1e-6)
        assert not torch.allclose(skip2.crossattn, cond.crossattn, atol=1e-3)


def test_sd1_adapter_basics(sd1):
    assert isinstance(sd1, ModelAdapter)
    assert (sd1.architecture, sd1.prediction_type) == ("sd1", "epsilon")
    reference = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    assert sd1.alphas_cumprod.shape == (1000,) and torch.allclose(sd1.alphas_cumprod, reference, atol=1e-6)
    targets = sd1.lora_targets()
    assert (len(targets["unet"]), len(targets["te"])) == (192, 72)
    assert len(sd1.lora_targets(include_conv=True)["unet"]) > 192
    with torch.no_grad():
        pixels = torch.rand(1, 3, 32, 48) * 2 - 1
        latents = sd1.encode_images(pixels)
        assert latents.shape == (1, 4, 4, 6)
        assert sd1.decode_latents(latents).shape == (1, 3, 32, 48)
        out = sd1.predict(torch.randn(2, 4, 4, 4), torch.tensor([10, 900]), sd1.encode_captions(CAPTIONS))
    assert out.shape == (2, 4, 4, 4) and torch.isfinite(out).all()
    assert len(sd1.model_id) == 12


def _bypass(module: torch.nn.Module):
    """A trainable scalar added to a module's output, the way injected LoRA modules wrap a forward."""
    scale = torch.nn.Parameter(torch.tensor(0.5))
    calls = []
    original = module.forward

    def forward(x, *args, **kwargs):
        calls.append(1)
        return original(x, *args, **kwargs) + scale * x.mean()

    module.forward = forward
    return scale, calls, lambda: module.__dict__.pop("forward")


def _grad(adapter, module_name, checkpointing):
    module = adapter.lora_targets()["unet"][module_name]
    scale, calls, remove = _bypass(module)
    adapter.enable_gradient_checkpointing(checkpointing)
    try:
        g = torch.Generator().manual_seed(1)
        x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
        adapter.predict(x, torch.tensor([500]), TextConditioning(ctx)).square().mean().backward()
    finally:
        remove()
        adapter.enable_gradient_checkpointing(False)
    return scale.grad, len(calls)


NAME = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"


def test_ldm_adapter_sees_through_the_webui_embedder_wrapper(ldm_sd1):
    from lora_trainer.models.ldm_adapter import LdmAdapter

    model = ldm_sd1.model
    embedder = model.cond_stage_model
    wrapper = torch.nn.Module()  # the WebUI's FrozenCLIPEmbedderWithCustomWords keeps the embedder as `.wrapped`
    wrapper.wrapped = embedder
    model.cond_stage_model = wrapper
    try:
        wrapped = LdmAdapter(model, model_id="x")
        assert wrapped.text_encoders()[0] is embedder.transformer
        assert wrapped.lora_targets()["te"] == ldm_sd1.lora_targets()["te"]
        with torch.no_grad():
            assert torch.equal(wrapped.encode_captions(CAPTIONS).crossattn, ldm_sd1.encode_captions(CAPTIONS).crossattn)
    finally:
        model.cond_stage_model = embedder


def test_ldm_model_id_follows_the_weights(ldm_sd1):
    from lora_trainer.models.ldm_adapter import LdmAdapter

    assert len(ldm_sd1.model_id) == 12 and LdmAdapter(ldm_sd1.model).model_id == ldm_sd1.model_id
    weight = ldm_sd1.unet().middle_block[1].proj_in.weight  # one tensor deep inside, as a partial merge would
    original = weight.detach().clone()
    with torch.no_grad():
        weight.view(-1)[0] += 1.0
        try:
            assert LdmAdapter(ldm_sd1.model).model_id != ldm_sd1.model_id
        finally:
            weight.copy_(original)


def test_checkpointing_keeps_gradients_of_injected_modules(sd1, ldm_sd1):
    plain, plain_calls = _grad(sd1, NAME, False)
    assert plain is not None and plain.abs() > 0 and plain_calls == 1
    for adapter in (sd1, ldm_sd1):
        grad, calls = _grad(adapter, NAME, True)
        assert calls == 2, type(adapter)  # recomputed in backward: checkpointing is really on
        assert torch.allclose(grad, plain, rtol=1e-3, atol=1e-7), (type(adapter), grad, plain)
    ldm_sd1.restore_checkpoint_flags()
    # ldm's own checkpointing (use_checkpoint in the yaml) gives the injected parameter no gradient at all
    own, _ = _grad_without_toggle(ldm_sd1, NAME)
    assert own is None or own.abs() == 0


def test_ldm_and_diffusers_adapters_agree(sd1, ldm_sd1):
    assert (ldm_sd1.architecture, ldm_sd1.prediction_type) == ("sd1", "epsilon")
    assert torch.allclose(ldm_sd1.alphas_cumprod, sd1.alphas_cumprod, atol=1e-6)
    for conv in (False, True):
        a, b = sd1.lora_targets(conv), ldm_sd1.lora_targets(conv)
        for component in ("unet", "te"):
            assert set(a[component]) == set(b[component])
            assert all(a[component][k].weight.shape == b[component][k].weight.shape for k in a[component])
    with torch.no_grad():
        cond_d = sd1.encode_captions(CAPTIONS, clip_skip=2, max_token_length=150)
        cond_l = ldm_sd1.encode_captions(CAPTIONS, clip_skip=2, max_token_length=150)
        assert torch.allclose(cond_d.crossattn, cond_l.crossattn, atol=1e-5)
        cond = sd1.encode_captions(CAPTIONS)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        t = torch.tensor([3, 777])
        out_d, out_l = sd1.predict(x, t, cond), ldm_sd1.predict(x, t, cond)
    assert out_l.shape == out_d.shape
    assert torch.allclose(out_l, out_d, atol=1e-4, rtol=1e-4), (out_l - out_d).abs().max()


def test_text_encoder_checkpointing_keeps_gradients(sd1):
    te = sd1.text_encoders()[0]
    module = sd1.lora_targets()["te"]["lora_te_text_model_encoder_layers_3_mlp_fc1"]
    grads = []
    te.train()
    try:
        for enabled in (False, True):
            scale, calls, remove = _bypass(module)
            sd1.enable_gradient_checkpointing(enabled)
            try:
                sd1.encode_captions(CAPTIONS[:1]).crossattn.square().mean().backward()
            finally:
                remove()
            grads.append((scale.grad, len(calls)))
    finally:
        sd1.enable_gradient_checkpointing(False)
        te.eval()
    (plain, plain_calls), (ckpt, ckpt_calls) = grads
    assert plain.abs() > 0 and (plain_calls, ckpt_calls) == (1, 2)
    assert torch.allclose(ckpt, plain, rtol=1e-4, atol=1e-8)


def _grad_without_toggle(adapter, module_name):
    module = adapter.lora_targets()["unet"][module_name]
    scale, calls, remove = _bypass(module)
    try:
        g = torch.Generator().manual_seed(1)
        x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
        x.requires_grad_(True)
        adapter.predict(x, torch.tensor([500]), TextConditioning(ctx)).square().mean().backward()
    finally:
        remove()
    return scale.grad, len(calls)


@pytest.fixture(scope="module")
def xl(tiny_sdxl):
    from lora_trainer.models.loading import load_checkpoint_adapter

    return load_checkpoint_adapter(tiny_sdxl.checkpoint, config_dir=tiny_sdxl.config_dir)


def webui_sdxl_module(name: str) -> list[str]:
    """Where the WebUI's Lora extension looks for an SDXL kohya name (networks.py `load_network`): the te2 rule of
    `convert_diffusers_name_to_compvis`, then its fallbacks (`re_x_proj`, `lora_unet` -> `diffusion_model`,
    `lora_te1_text_model` -> `0_transformer_text_model`)."""
    if m := re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", name):
        rest = m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        key = f"1_model_transformer_resblocks_{m[1]}_{rest}"
        x_proj = re.match(r"(.*)_([qkv]_proj)$", key)
        return [key] + ([x_proj[1]] if x_proj else [])
    return [name.replace("lora_unet", "diffusion_model").replace("lora_te1_text_model", "0_transformer_text_model")]


def webui_sdxl_layer_names(checkpoint_keys) -> set[str]:
    """The WebUI's `network_layer_mapping` names of an SDXL checkpoint's modules (sgm tree), from its keys."""
    prefixes = {"model.": "", "conditioner.embedders.0.": "0_", "conditioner.embedders.1.": "1_"}
    names = set()
    for key in checkpoint_keys:
        for prefix, short in prefixes.items():
            if key.startswith(prefix):
                names.add(short + key[len(prefix):].rsplit(".", 1)[0].replace(".", "_"))
    return names


def test_sdxl_names_resolve_with_the_webui_rules(xl, tiny_sdxl):
    from safetensors import safe_open

    with safe_open(str(tiny_sdxl.checkpoint), "pt") as handle:
        layers = webui_sdxl_layer_names(handle.keys())
    for component in ("unet", "te1", "te2"):
        for name in xl.lora_targets(include_conv=True).get(component, {}):
            assert any(c in layers for c in webui_sdxl_module(name)), f"{name}: {webui_sdxl_module(name)}"


def test_sdxl_adapter(xl):
    assert xl.architecture == "sdxl"
    targets = xl.lora_targets()
    assert {k: len(v) for k, v in targets.items()} == {"unet": 722, "te1": 72, "te2": 192}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in targets["unet"]
    te1, te2 = xl.text_encoders()
    with torch.no_grad():
        cond = xl.encode_captions(CAPTIONS, max_token_length=150)
        width = te1.config.hidden_size + te2.config.hidden_size
        assert cond.crossattn.shape == (2, 154, width)
        ids = tokenize_chunks(xl.tokenizers[1], CAPTIONS, 150)[:, 0]
        assert torch.allclose(cond.pooled, te2(input_ids=ids).text_embeds, atol=1e-5)
        size_cond = torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)
        out = xl.predict(torch.randn(2, 4, 4, 4), torch.tensor([1, 999]), cond, size_cond)
        assert out.shape == (2, 4, 4, 4) and torch.isfinite(out).all()
        with pytest.raises(ValueError, match="size_cond"):
            xl.predict(torch.randn(2, 4, 4, 4), torch.tensor([1, 999]), cond)


def test_loading_errors_name_the_file(tmp_path, tiny_sd1):
    from lora_trainer.models.loading import load_checkpoint_adapter

    with pytest.raises(ModelLoadError, match="not found"):
        load_checkpoint_adapter(tmp_path / "missing.safetensors")
    with pytest.raises(ModelLoadError, match="unet/config.json"):
        load_checkpoint_adapter(tiny_sd1.checkpoint, config_dir=tmp_path)
    wrong = tmp_path / "sdxl_configs"
    shutil.copytree(tiny_sd1.config_dir, wrong)
    unet_cfg = json.loads((wrong / "unet" / "config.json").read_text())
    unet_cfg.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=64)
    (wrong / "unet" / "config.json").write_text(json.dumps(unet_cfg))
    with pytest.raises(ModelLoadError, match="tiny_sd1.safetensors.*diffusers_config_dir"):
        load_checkpoint_adapter(tiny_sd1.checkpoint, config_dir=wrong)
    with pytest.raises(ModelLoadError, match="vocab.json"):
        load_checkpoint_adapter(tiny_sd1.checkpoint, config_dir=tiny_sd1.config_dir, tokenizer_dir=tmp_path)


def test_tokenizers_are_built_offline_when_none_are_given(tmp_path):
    from lora_trainer.models.loading import load_tokenizers

    tokenizers = load_tokenizers("sdxl", tmp_path)
    assert [t.pad_token for t in tokenizers] == ["<|endoftext|>", "!"]
    assert tokenizers[0]("a photo")["input_ids"] == tokenizers[1]("a photo")["input_ids"]


def test_encode_clip_rejects_bad_clip_skip(sd1):
    ids = tokenize_chunks(sd1.tokenizers[0], ["x"], 75)
    with pytest.raises(ValueError, match="clip_skip"):
        encode_clip(sd1.text_encoders()[0], ids, clip_skip=0)


def test_sd2_v_adapter_and_open_clip_encoding_agree(sd2, tiny_sd2):
    from safetensors.torch import load_file

    from lora_trainer.models.naming import te_targets
    from lora_trainer.models.text_encoding import encode_open_clip

    assert (sd2.architecture, sd2.prediction_type) == ("sd2-v", "v_prediction")
    assert sd2.tokenizers[0].pad_token == "!"
    targets = sd2.lora_targets()
    assert (len(targets["unet"]), len(targets["te"])) == (192, 23 * 6)  # diffusers/kohya drop the unused layer
    tower = open_clip_tower(load_file(str(tiny_sd2.checkpoint)))
    assert set(te_targets(tower, "lora_te_", max_layers=23)) == set(targets["te"])
    with torch.no_grad():
        ids = tokenize_chunks(sd2.tokenizers[0], CAPTIONS, 150)
        expected = sd2.encode_captions(CAPTIONS, max_token_length=150).crossattn
        assert torch.allclose(encode_open_clip(tower, ids, layer_idx=1), expected, atol=1e-5)
        skip2 = sd2.encode_captions(CAPTIONS, clip_skip=2, max_token_length=150).crossattn
        assert torch.allclose(encode_open_clip(tower, ids, layer_idx=2), skip2, atol=1e-5)


def test_ldm_sd2_v_agrees_with_diffusers(sd2, tiny_sd2):
    from lora_trainer.models.ldm_adapter import LdmAdapter
    from lora_trainer.testing.open_clip_tower import build_ldm_sd2

    latent_diffusion = build_ldm_sd2(tiny_sd2)
    if latent_diffusion is None:
        pytest.skip("Stability's `ldm` package is not importable (install stable-diffusion-sdkit)")
    latent_diffusion.parameterization = "v"  # the 768-v yaml says so; the tiny yaml is the 512 base one
    ldm = LdmAdapter(latent_diffusion, tokenizer=sd2.tokenizers[0])
    assert (ldm.architecture, ldm.prediction_type) == ("sd2-v", "v_prediction")
    for conv in (False, True):
        a, b = sd2.lora_targets(conv), ldm.lora_targets(conv)
        assert {k: set(v) for k, v in a.items()} == {k: set(v) for k, v in b.items()}
    assert ldm.lora_targets()["te"]["lora_te_text_model_encoder_layers_0_self_attn_v_proj"] is \
        latent_diffusion.cond_stage_model.model.transformer.resblocks[0].attn
    with torch.no_grad():
        cond = sd2.encode_captions(CAPTIONS, clip_skip=2)
        assert torch.allclose(ldm.encode_captions(CAPTIONS, clip_skip=2).crossattn, cond.crossattn, atol=1e-5)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
        t = torch.tensor([50, 950])
        assert torch.allclose(ldm.predict(x, t, cond), sd2.predict(x, t, cond), atol=1e-4, rtol=1e-4)


def test_file_id_is_stable_and_sees_changes_anywhere(tmp_path):
    import hashlib

    from lora_trainer.models.loading import file_id

    data = bytearray(torch.randint(0, 256, (3 << 20,), dtype=torch.uint8).numpy().tobytes())
    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(data))
    first = file_id(path)
    assert first == hashlib.sha256(data).hexdigest()[:12]
    for offset in (0, len(data) // 2 + 12345, len(data) - 1):
        changed = bytearray(data)
        changed[offset] ^= 0xFF
        path.write_bytes(bytes(changed))
        assert file_id(path) != first, offset


def test_noise_schedule_from_config():
    from lora_trainer.models.diffusers_adapter import alphas_cumprod_from_config

    linear = alphas_cumprod_from_config({"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02})
    assert torch.allclose(linear, DDPMScheduler(beta_schedule="linear").alphas_cumprod, atol=1e-6)
    with pytest.raises(ValueError, match="beta_schedule"):
        alphas_cumprod_from_config({"beta_schedule": "squaredcos_cap_v2"})
