"""End to end on the tiny SD1 model: learning, resume, determinism, events, stop commands, NaN and OOM."""
from __future__ import annotations

import pytest
import torch

from lora_trainer.config import TrainConfig, load_toml, update_config
from lora_trainer.errors import TrainingError
from lora_trainer.models.loading import load_checkpoint_adapter
from lora_trainer.networks import LoRANetwork, load_lora
from lora_trainer.testing.datasets import write_square_dataset
from lora_trainer.train import (
    EventBus,
    Failed,
    Finished,
    Progress,
    Saved,
    Started,
    Step,
    TrainCommands,
    Trainer,
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def adapter(tiny_sd1):
    return load_checkpoint_adapter(tiny_sd1.checkpoint, config_dir=tiny_sd1.config_dir,
                                   tokenizer_dir=tiny_sd1.tokenizer_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_square_dataset(tmp_path_factory.mktemp("train_data"))


def _config(tiny, data, out, **values) -> TrainConfig:
    base = dict(
        pretrained_model_name_or_path=str(tiny.checkpoint), train_data_dir=str(data), resolution=(64, 64),
        output_dir=str(out), output_name="t", max_train_steps=4, learning_rate=1e-3, seed=7, cache_latents=True,
        train_batch_size=1, network_dim=4, network_alpha=4, network_train_unet_only=True, save_precision="float",
    )
    base.update(values)
    return update_config(TrainConfig(), base)


def _run(config, adapter, subscriber=None, commands=None):
    bus, events = EventBus(), []
    bus.subscribe(events.append)
    if subscriber is not None:
        bus.subscribe(subscriber)
    trainer = Trainer(config, adapter, bus, commands)
    return trainer, trainer.run(), events


def _fixed_eval(adapter, latents, network=None, multiplier=1.0) -> float:
    """Denoising loss on the training latents at fixed noise and timesteps (independent of the train RNG)."""
    g = torch.Generator().manual_seed(123)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.tensor([100, 300, 500, 700])[: len(latents)]
    ac = adapter.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = ac.sqrt() * latents + (1 - ac).sqrt() * noise
    cond = adapter.encode_captions([f"square, red, item{i}" for i in range(len(latents))])
    if network is not None:
        network.multiplier = multiplier
    with torch.no_grad():
        return torch.nn.functional.mse_loss(adapter.predict(noisy, t, cond), noise).item()


def _unet_probe(adapter) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        return adapter.predict(x, torch.tensor([400]), adapter.encode_captions(["square"]))


def test_overfit_learns_and_leaves_the_model_as_it_was(tiny_sd1, dataset, adapter, tmp_path):
    probe = _unet_probe(adapter)
    flags = [p.requires_grad for p in adapter.unet().parameters()]
    cfg = _config(tiny_sd1, dataset, tmp_path, max_train_steps=30, train_batch_size=4, learning_rate=3e-3)
    _, result, _ = _run(cfg, adapter)
    assert result.steps == 30 and not result.stopped and len(result.losses) == 30

    assert torch.equal(_unet_probe(adapter), probe), "training must leave the base model untouched"
    assert [p.requires_grad for p in adapter.unet().parameters()] == flags
    from lora_trainer.data.images import image_to_tensor, load_image

    pixels = torch.stack([image_to_tensor(load_image(str(p))) for p in sorted((dataset / "1_square").glob("*.png"))])
    torch.manual_seed(0)
    with torch.no_grad():
        latents = adapter.encode_images(pixels)
    state_dict, meta = load_lora(result.lora_path)
    network = LoRANetwork.from_kohya(adapter.lora_targets(), state_dict)
    network.apply()
    try:
        before = _fixed_eval(adapter, latents, network, 0.0)
        after = _fixed_eval(adapter, latents, network, 1.0)
        changed = _unet_probe(adapter)
    finally:
        network.remove()
    assert after < before * 0.9, f"LoRA did not fit the training images: {before:.4f} -> {after:.4f}"
    assert not torch.allclose(changed, probe, atol=1e-4)
    assert meta["ss_network_dim"] == "4" and meta["ss_max_train_steps"] == "30"
    assert load_toml(tmp_path / "t.toml").config == cfg


def test_resume_equals_uninterrupted_and_events_in_order(tiny_sd1, dataset, adapter, tmp_path):
    cfg = _config(tiny_sd1, dataset, tmp_path / "a", max_train_steps=6, save_every_n_steps=3, save_state=True,
                  noise_offset=0.05, multires_noise_iterations=2, min_snr_gamma=5.0)

    def broken_subscriber(event):
        raise RuntimeError("a broken UI must not stop training")

    _, full, events = _run(cfg, adapter, broken_subscriber)
    kinds = [type(e) for e in events]
    assert kinds[0] is Progress and kinds[-1] is Finished
    start = kinds.index(Started)
    assert events[start].total_steps == 6 and events[start].total_epochs == 2  # 4 batches per epoch
    steps = [e for e in events if isinstance(e, Step)]
    assert [s.step for s in steps] == [1, 2, 3, 4, 5, 6] and [s.epoch for s in steps] == [1, 1, 1, 1, 2, 2]
    assert [s.loss for s in steps] == full.losses
    saved = [e for e in events if isinstance(e, Saved)]
    assert [(s.step, s.path.split("/")[-1]) for s in saved] == [(3, "t-step00000003.safetensors"),
                                                                 (6, "t.safetensors")]
    assert kinds.index(Saved) == kinds.index(Step) + 3  # right after step 3
    assert events[-1] == Finished(full.lora_path, False, 6)

    resumed_cfg = update_config(cfg, {"resume": str(tmp_path / "a" / "t-step00000003-state"),
                                      "output_dir": str(tmp_path / "b"), "save_every_n_steps": None})
    _, resumed, _ = _run(resumed_cfg, adapter)
    assert resumed.losses == full.losses
    a, b = load_lora(full.lora_path)[0], load_lora(resumed.lora_path)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    _, again, _ = _run(update_config(cfg, {"output_dir": str(tmp_path / "c"), "max_train_steps": 2,
                                           "save_every_n_steps": None, "save_state": False}), adapter)
    assert again.losses == full.losses[:2], "same seed and config must give the same losses"


def test_stop_and_stop_and_save(tiny_sd1, dataset, adapter, tmp_path):
    for save in (False, True):
        commands = TrainCommands()

        def at_step_two(event, commands=commands, save=save):
            if isinstance(event, Step) and event.step == 2:
                commands.request_stop(save=save)

        out = tmp_path / str(save)
        cfg = _config(tiny_sd1, dataset, out, cache_latents=False, flip_aug=True)  # VAE encodes every batch
        _, result, events = _run(cfg, adapter, at_step_two, commands)
        assert result.stopped and result.steps == 2
        assert events[-1] == Finished(result.lora_path, True, 2)
        assert (out / "t.safetensors").exists() is save and (result.lora_path is not None) is save


def test_nan_loss_stops_and_keeps_the_last_good_file(tiny_sd1, dataset, adapter, tmp_path):
    probe = _unet_probe(adapter)
    holder = {}

    def poison_after_step_three(event):
        if isinstance(event, Step) and event.step == 3:
            with torch.no_grad():
                next(holder["trainer"].network.parameters()).fill_(float("nan"))

    cfg = _config(tiny_sd1, dataset, tmp_path, max_train_steps=8, save_every_n_steps=2)
    bus, events = EventBus(), []
    bus.subscribe(events.append)
    bus.subscribe(poison_after_step_three)
    holder["trainer"] = Trainer(cfg, adapter, bus)
    with pytest.raises(TrainingError, match="step 4: the loss is nan") as info:
        holder["trainer"].run()
    assert "t-step00000002.safetensors is kept" in str(info.value) and "learning_rate" in str(info.value)
    assert isinstance(events[-1], Failed) and events[-1].message == str(info.value)
    assert (tmp_path / "t-step00000002.safetensors").exists() and not (tmp_path / "t.safetensors").exists()
    good = load_lora(tmp_path / "t-step00000002.safetensors")[0]
    assert all(torch.isfinite(v).all() for v in good.values())
    assert torch.equal(_unet_probe(adapter), probe)


def test_out_of_memory_is_explained(tiny_sd1, dataset, adapter, tmp_path, monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(adapter, "predict", no_memory)  # the real error cannot be provoked on a CPU
    with pytest.raises(TrainingError, match="ran out of memory.*train_batch_size.*gradient_checkpointing"):
        _run(_config(tiny_sd1, dataset, tmp_path), adapter)


def test_features_together(tiny_sd1, dataset, adapter, tmp_path):
    """Text-encoder LoRA, bf16 autocast, gradient checkpointing, accumulation, epochs, pruning, samples, logs."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# previews\nsquare, red --n blurry --w 64 --h 64 --s 2 --d 3\n", encoding="utf-8")
    cfg = _config(
        tiny_sd1, dataset, tmp_path / "out", network_train_unet_only=False, text_encoder_lr=5e-4,
        mixed_precision="bf16", gradient_checkpointing=True, gradient_accumulation_steps=2, max_train_epochs=3,
        save_every_n_epochs=1, save_last_n_epochs=1, sample_every_n_epochs=1, sample_prompts=str(prompts),
        optimizer_type="AdamW8bit", lr_scheduler="cosine", lr_warmup_steps=0.5, min_snr_gamma=5.0,
        debiased_estimation_loss=True, log_with="tensorboard", logging_dir=str(tmp_path / "logs"),
    )
    te_modes = [m.training for m in adapter.text_encoders()[0].modules()]
    _, result, events = _run(cfg, adapter)
    steps = [e for e in events if isinstance(e, Step)]
    assert [s.epoch for s in steps] == [1, 1, 2, 2, 3, 3] and all(torch.isfinite(torch.tensor(result.losses)))
    lrs = [s.lr for s in steps]
    assert lrs[0] < lrs[2] and lrs[-1] < lrs[2], f"warm-up then cosine decay expected, got {lrs}"
    saved = [e.path.rsplit("/", 1)[-1] for e in events if isinstance(e, Saved)]
    assert saved == ["t-000001.safetensors", "t-000002.safetensors", "t.safetensors"]
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["t-000002.safetensors", "t-000002.toml", "t.safetensors", "t.toml"]  # epoch 1 pruned
    samples = [e for e in events if type(e).__name__ == "Sample"]
    assert len(samples) == 3 and samples[0].images[0].size == (64, 64)
    state_dict, meta = load_lora(result.lora_path)
    assert any(k.startswith("lora_te_") for k in state_dict) and any(k.startswith("lora_unet_") for k in state_dict)
    assert meta["ss_epoch"] == "3" and meta["ss_gradient_accumulation_steps"] == "2"
    run_dirs = list((tmp_path / "logs").iterdir())
    assert len(run_dirs) == 1 and len((run_dirs[0] / "steps.csv").read_text().splitlines()) == 7
    assert any(p.name.startswith("events.out.tfevents") for p in run_dirs[0].iterdir())
    assert not adapter.unet().is_gradient_checkpointing
    assert [m.training for m in adapter.text_encoders()[0].modules()] == te_modes


@pytest.mark.parametrize("arch", ["sd2", "sdxl"])
def test_other_architectures_train(arch, request, dataset, tmp_path):
    """SD2 as a v-prediction model (v target) and SDXL (pooled text, size conditioning, two text encoders)."""
    tiny = request.getfixturevalue(f"tiny_{arch}")
    model = load_checkpoint_adapter(tiny.checkpoint, v_parameterization=arch == "sd2", config_dir=tiny.config_dir,
                                    tokenizer_dir=tiny.tokenizer_dir, device="cpu", dtype=torch.float32)
    assert model.prediction_type == ("v_prediction" if arch == "sd2" else "epsilon")
    cfg = _config(tiny, dataset, tmp_path, max_train_steps=2, train_batch_size=2, network_train_unet_only=False,
                  min_snr_gamma=5.0)
    _, result, _ = _run(cfg, model)
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    prefixes = {key.split(".")[0].split("_")[1] for key in load_lora(result.lora_path)[0]}
    assert prefixes == ({"unet", "te1", "te2"} if arch == "sdxl" else {"unet", "te"})


def test_resume_from_another_network_is_refused(tiny_sd1, dataset, adapter, tmp_path):
    first = _config(tiny_sd1, dataset, tmp_path / "a", max_train_steps=1, save_state=True)
    _run(first, adapter)
    other = update_config(first, {"network_dim": 8, "output_dir": str(tmp_path / "b"),
                                  "resume": str(tmp_path / "a" / "t-state")})
    with pytest.raises(TrainingError, match="resume: .*t-state does not fit this run"):
        _run(other, adapter)
