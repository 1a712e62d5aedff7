"""EMA of the LoRA weights on the tiny SD1 model: the formula step by step (warm-up, interval), the `-ema` file, resume,
config keys, and the snapshot files a grid lists."""
from __future__ import annotations

import json

import pytest
import torch

from lora_trainer.config import TrainConfig, load_toml, save_toml, update_config
from lora_trainer.errors import ConfigError
from lora_trainer.grids import run_snapshot_files, snapshot_label
from lora_trainer.models.loading import load_checkpoint_adapter
from lora_trainer.networks import load_lora
from lora_trainer.testing.datasets import write_square_dataset
from lora_trainer.tools.lora_file import read_lora
from lora_trainer.train import EventBus, Started, Step, Trainer, ema_decay, read_ema_metadata

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def adapter(tiny_sd1):
    return load_checkpoint_adapter(tiny_sd1.checkpoint, config_dir=tiny_sd1.config_dir,
                                   tokenizer_dir=tiny_sd1.tokenizer_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_square_dataset(tmp_path_factory.mktemp("ema_data"))


def _config(tiny, data, out, **values) -> TrainConfig:
    base = dict(
        pretrained_model_name_or_path=str(tiny.checkpoint), train_data_dir=str(data), resolution=(64, 64),
        output_dir=str(out), output_name="e", max_train_steps=4, learning_rate=1e-2, seed=7, cache_latents=True,
        train_batch_size=1, network_dim=4, network_alpha=4, network_train_unet_only=True, save_precision="float",
        ema=True, ema_decay=0.9,
    )
    base.update(values)
    return update_config(TrainConfig(), base)


def _recording_run(config, adapter):
    """Train; record the trained weights and the EMA at the start and after every step."""
    bus, weights, emas = EventBus(), [], []
    trainer = Trainer(config, adapter, bus)

    def record(event):
        if isinstance(event, (Started, Step)):
            weights.append([p.detach().clone() for p in trainer.ema.params])
            emas.append([t.clone() for t in trainer.ema.shadow])

    bus.subscribe(record)
    return trainer, trainer.run(), weights, emas


def test_warmup_formula_and_cap():
    assert ema_decay(0.999, 0, warmup=True) == pytest.approx(0.1)     # (1 + 0) / (10 + 0)
    assert ema_decay(0.999, 8, warmup=True) == pytest.approx(0.5)     # 9 / 18
    assert ema_decay(0.999, 10_000, warmup=True) == 0.999             # capped at ema_decay
    assert ema_decay(0.9, 3, warmup=False) == 0.9
    assert ema_decay(0.0, 5, warmup=True) == 0.0


@pytest.mark.parametrize("warmup, every", [(True, 1), (False, 2)])
def test_ema_follows_its_formula_step_by_step(tiny_sd1, dataset, adapter, tmp_path, warmup, every):
    cfg = _config(tiny_sd1, dataset, tmp_path, ema_warmup=warmup, ema_update_every=every)
    trainer, result, weights, emas = _recording_run(cfg, adapter)
    assert result.steps == 4 and len(weights) == 5
    expected = weights[0]  # the EMA starts as a copy of the starting weights
    assert all(torch.equal(a, b) for a, b in zip(emas[0], expected))
    updates = 0
    for step in range(1, 5):
        if step % every == 0:
            d = min(0.9, (1 + updates) / (10 + updates)) if warmup else 0.9
            expected = [d * e + (1 - d) * w for e, w in zip(expected, weights[step])]
            updates += 1
        for got, want in zip(emas[step], expected):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        assert not all(torch.equal(a, b) for a, b in zip(weights[step], weights[step - 1])), "training moved"
    assert trainer.ema.updates == updates == 4 // every
    if every == 2:  # no update after odd steps
        assert all(torch.equal(a, b) for a, b in zip(emas[1], emas[0]))
        assert all(torch.equal(a, b) for a, b in zip(emas[3], emas[2]))
    assert not all(torch.allclose(a, b) for a, b in zip(emas[-1], weights[-1])), "the EMA lags the weights"


def test_ema_file_beside_each_snapshot(tiny_sd1, dataset, adapter, tmp_path):
    cfg = _config(tiny_sd1, dataset, tmp_path, save_every_n_steps=2)
    trainer, result, _, _ = _recording_run(cfg, adapter)
    names = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert names == ["e-ema.safetensors", "e-step00000002-ema.safetensors", "e-step00000002.safetensors",
                     "e.safetensors"]
    raw_sd, raw_meta = load_lora(tmp_path / "e.safetensors")
    ema_sd, ema_meta = load_lora(tmp_path / "e-ema.safetensors")
    assert ema_sd.keys() == raw_sd.keys()
    want = trainer.ema.kohya_state_dict(torch.float32)
    assert all(torch.equal(ema_sd[k], want[k]) for k in want)
    assert any(not torch.equal(ema_sd[k], raw_sd[k]) for k in raw_sd if k.endswith("lora_up.weight"))
    assert all(torch.equal(ema_sd[k], raw_sd[k]) for k in raw_sd if k.endswith(".alpha"))
    same = {k: v for k, v in raw_meta.items() if not k.startswith("sshs_")}
    assert {k: ema_meta[k] for k in same} == same, "the kohya metadata of the raw file"
    assert ema_meta["sshs_model_hash"] != raw_meta["sshs_model_hash"]
    assert read_ema_metadata(ema_meta) == {"decay": 0.9, "warmup": True, "update_every": 1, "updates": 4}
    assert read_ema_metadata(raw_meta) is None
    step_meta = json.loads(load_lora(tmp_path / "e-step00000002-ema.safetensors")[1]["lora_trainer_ema"])
    assert step_meta["updates"] == 2
    lora = read_lora(tmp_path / "e-ema.safetensors")  # the tools' reader takes it as any kohya LoRA
    assert lora.architecture == "sd1" and len(lora.modules) == len(trainer.network.loras)
    assert run_snapshot_files(tmp_path / "e.safetensors") == [
        tmp_path / n for n in ("e-step00000002.safetensors", "e-step00000002-ema.safetensors", "e.safetensors",
                               "e-ema.safetensors")]
    assert [snapshot_label(p) for p in run_snapshot_files(tmp_path / "e-ema.safetensors")] == [
        "step 2", "step 2 (EMA)", "e", "e (EMA)"]


def test_resume_gives_the_ema_of_an_uninterrupted_run(tiny_sd1, dataset, adapter, tmp_path):
    cfg = _config(tiny_sd1, dataset, tmp_path / "a", max_train_steps=5, save_every_n_steps=2, save_state=True,
                  ema_update_every=2, ema_warmup=True)
    full, full_result, _, _ = _recording_run(cfg, adapter)
    state = tmp_path / "a" / "e-step00000002-state"
    assert (state / "ema.safetensors").is_file()
    resumed_cfg = update_config(cfg, {"resume": str(state), "output_dir": str(tmp_path / "b"),
                                      "save_every_n_steps": None})
    resumed, resumed_result, _, _ = _recording_run(resumed_cfg, adapter)
    assert resumed_result.losses == full_result.losses
    assert resumed.ema.updates == full.ema.updates == 2
    assert all(torch.equal(a, b) for a, b in zip(resumed.ema.shadow, full.ema.shadow))
    a, b = load_lora(tmp_path / "a" / "e-ema.safetensors")[0], load_lora(tmp_path / "b" / "e-ema.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ema_keys_are_checked_and_round_trip(tmp_path):
    for key, value, text in (("ema_decay", 1.5, "ema_decay = 1.5: must be in \\[0, 1\\]"),
                             ("ema_decay", -0.1, "ema_decay = -0.1: must be in \\[0, 1\\]"),
                             ("ema_update_every", 0, "ema_update_every = 0: out of range"),
                             ("ema_device", "gpu", "ema_device = 'gpu': not supported. Use one of: same, cpu")):
        with pytest.raises(ConfigError, match=text):
            update_config(TrainConfig(), {"ema": True, key: value})
    cfg = update_config(TrainConfig(), {"ema": True, "ema_decay": 0.99, "ema_warmup": False, "ema_update_every": 5,
                                        "ema_device": "CPU"})
    assert cfg.training.ema_device == "cpu"
    save_toml(cfg, tmp_path / "c.toml")
    assert load_toml(tmp_path / "c.toml").config == cfg
    text = "[training_arguments]\nema = true\nema_decay = 0.995\n"
    (tmp_path / "k.toml").write_text(text, encoding="utf-8")
    loaded = load_toml(tmp_path / "k.toml")
    assert loaded.config.training.ema and loaded.config.training.ema_decay == 0.995 and not loaded.unknown_keys


def test_old_epoch_ema_files_are_pruned_with_their_lora(tiny_sd1, dataset, adapter, tmp_path):
    cfg = _config(tiny_sd1, dataset, tmp_path, max_train_epochs=3, max_train_steps=100, train_batch_size=4,
                  save_every_n_epochs=1, save_last_n_epochs=1)
    _recording_run(cfg, adapter)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        "e-000002-ema.safetensors", "e-000002.safetensors", "e-ema.safetensors", "e.safetensors"]


def test_resource_estimate_counts_the_ema_copy_and_files():
    from lora_trainer.train.preparation import plan_steps
    from lora_trainer.train.resources import estimate_resources

    plan = plan_steps(4, 1, 8, None)
    base = {"save_every_n_steps": 4, "save_state": True, "save_precision": "fp16"}
    off = estimate_resources(update_config(TrainConfig(), base), 1000, plan)
    on = estimate_resources(update_config(TrainConfig(), {**base, "ema": True}), 1000, plan)
    on_cpu = estimate_resources(update_config(TrainConfig(), {**base, "ema": True, "ema_device": "cpu"}), 1000, plan)
    assert on.training_bytes == off.training_bytes + 4000 and on_cpu.training_bytes == off.training_bytes
    assert on.saves == off.saves == 2
    assert on.disk_bytes == off.disk_bytes + 2 * (1000 * 2 + 1000 * 4)  # per save: the -ema file and the state's


def test_the_train_panel_form_sets_the_ema_keys():
    from lora_trainer.ui import train_views as views

    base = TrainConfig()
    values = dict(zip(views.FORM_KEYS, views.config_to_form(base)))
    assert (values["ema"], values["ema_decay"], values["ema_device"]) == (False, 0.999, "same")
    values.update(ema=True, ema_decay=0.995, ema_warmup=False, ema_update_every=3, ema_device="cpu")
    config = views.form_to_config(base, "/data", [values[key] for key in views.FORM_KEYS])
    t = config.training
    assert (t.ema, t.ema_decay, t.ema_warmup, t.ema_update_every, t.ema_device) == (True, 0.995, False, 3, "cpu")
    values.update(ema_decay=2.0)
    with pytest.raises(ConfigError, match="ema_decay = 2.0"):
        views.form_to_config(base, "/data", [values[key] for key in views.FORM_KEYS])
