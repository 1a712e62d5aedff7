"""Model adapters on tiny real-architecture checkpoints: loading, encoding, prediction, targets, checkpointing."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from lora_trainer.errors import ModelLoadError
from lora_trainer.models.adapter import ModelAdapter, TextConditioning
from lora_trainer.models.text_encoding import encode_clip, tokenize_chunks

CAPTIONS = ["a photo of a cat, masterpiece", "1girl, solo, long hair, " * 12]


@pytest.fixture(scope="module")
def sd1(tiny_sd1):
    from lora_trainer.models.loading import load_checkpoint_adapter

    return load_checkpoint_adapter(tiny_sd1.checkpoint, config_dir=tiny_sd1.config_dir)


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


def test_diffusers_checkpointing_keeps_gradients_of_injected_modules(sd1):
    plain, plain_calls = _grad(sd1, NAME, False)
    ckpt, ckpt_calls = _grad(sd1, NAME, True)
    assert plain is not None and plain.abs() > 0
    assert ckpt_calls == 2 * plain_calls  # recomputed in backward: checkpointing is really on
    assert torch.allclose(ckpt, plain, rtol=1e-4, atol=1e-8)


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


def test_ldm_checkpointing_gives_injected_modules_gradients(ldm_sd1):
    name = NAME
    plain, plain_calls = _grad(ldm_sd1, name, False)
    ckpt, ckpt_calls = _grad(ldm_sd1, name, True)
    assert plain.abs() > 0 and ckpt_calls == 2 * plain_calls
    assert torch.allclose(ckpt, plain, rtol=1e-4, atol=1e-8)
    ldm_sd1.restore_checkpoint_flags()
    # ldm's own checkpointing (use_checkpoint in the yaml) gives the injected parameter no gradient at all
    own, _ = _grad_without_toggle(ldm_sd1, name)
    assert own is None or own.abs() == 0


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


def test_sdxl_adapter(tiny_sdxl):
    from lora_trainer.models.loading import load_checkpoint_adapter

    xl = load_checkpoint_adapter(tiny_sdxl.checkpoint, config_dir=tiny_sdxl.config_dir)
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


def test_encode_clip_rejects_bad_clip_skip(sd1):
    ids = tokenize_chunks(sd1.tokenizers[0], ["x"], 75)
    with pytest.raises(ValueError, match="clip_skip"):
        encode_clip(sd1.text_encoders()[0], ids, clip_skip=0)
