"""Validation loss on a held-out split: the split, determinism, no effect on training, events, logs, config."""
from __future__ import annotations

import csv
import math

import pytest
import torch

from lora_trainer.config import TrainConfig, update_config
from lora_trainer.data.folders import scan_dataset
from lora_trainer.errors import ConfigError
from lora_trainer.models.loading import load_checkpoint_adapter
from lora_trainer.networks import LoRANetwork, load_lora
from lora_trainer.testing.datasets import write_square_dataset
from lora_trainer.train import EventBus, Step, Trainer, Validation, split_validation
from lora_trainer.train.validation import concept_name

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def adapter(tiny_sd1):
    return load_checkpoint_adapter(tiny_sd1.checkpoint, config_dir=tiny_sd1.config_dir,
                                   tokenizer_dir=tiny_sd1.tokenizer_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("val_data")
    write_square_dataset(root, "1_red", count=5, caption="red square, item{i}")
    write_square_dataset(root, "1_green", count=4, caption="green square, item{i}", fill=(20, 200, 40), seed=1)
    return root


def _config(tiny, data, out, **values) -> TrainConfig:
    base = dict(
        pretrained_model_name_or_path=str(tiny.checkpoint), train_data_dir=str(data), resolution=(64, 64),
        output_dir=str(out), output_name="v", max_train_steps=4, learning_rate=1e-3, seed=7, cache_latents=True,
        train_batch_size=1, network_dim=4, network_alpha=4, network_train_unet_only=True, save_precision="float",
        network_dropout=0.3,  # dropout is on in training, off in evaluation
    )
    base.update(values)
    return update_config(TrainConfig(), base)


def _run(config, adapter):
    bus, events = EventBus(), []
    bus.subscribe(events.append)
    trainer = Trainer(config, adapter, bus)
    return trainer, trainer.run(), events


def test_split_is_deterministic_per_concept_and_needs_a_training_image(dataset):
    index = scan_dataset(str(dataset))
    first = split_validation(index, 0.25, seed=3)
    again = split_validation(scan_dataset(str(dataset)), 0.25, seed=3)
    held = [(i.concept, i.path) for i in first.held_out.items]
    assert held == [(i.concept, i.path) for i in again.held_out.items]
    assert sorted(i.concept for i in first.held_out.items) == ["green", "red"]  # one of each folder
    assert {i.path for i in first.train.items}.isdisjoint(p for _, p in held)
    assert len(first.train.items) + len(held) == len(index.items)
    others = {tuple(i.path for i in split_validation(index, 0.25, seed=s).held_out.items) for s in range(8)}
    assert len(others) > 1, "the seed chooses the held-out images"
    assert split_validation(index, 0.0, seed=3).held_out.items == []
    with pytest.raises(ConfigError, match="validation_split = 0.9: the concept folder 1_green has 4 image"):
        split_validation(index, 0.9, seed=3)


def test_a_dataset_config_sets_the_split_per_dataset(dataset, tmp_path):
    from lora_trainer.config.schema import DatasetConfig

    toml = tmp_path / "dataset.toml"
    toml.write_text(f"""
[general]
resolution = 64
validation_seed = 5
[[datasets]]
validation_split = 0.5
  [[datasets.subsets]]
  image_dir = '{dataset / "1_red"}'
[[datasets]]
  [[datasets.subsets]]
  image_dir = '{dataset / "1_green"}'
""", encoding="utf-8")
    index = scan_dataset(DatasetConfig(dataset_config=str(toml)))
    held = split_validation(index, 0.0, seed=3).held_out.items
    assert [concept_name(i) for i in held] == ["1_red"] * 2  # round(5 x 0.5); the second dataset takes the run's 0
    with_run_split = split_validation(index, 0.25, seed=3).held_out.items
    assert [concept_name(i) for i in with_run_split] == ["1_red", "1_red", "1_green"]
    assert [i.path for i in with_run_split[:2]] == [i.path for i in held], "the dataset's own seed wins"
    toml.write_text(toml.read_text().replace("validation_split = 0.5", "validation_split = 1.0"))
    with pytest.raises(ConfigError, match="validation_split = 1.0: must be in \\[0, 1\\)"):
        scan_dataset(DatasetConfig(dataset_config=str(toml)))


def test_config_keys_are_checked(tiny_sd1, dataset, tmp_path):
    for key, value, text in (("validation_split", 1.0, "must be in \\[0, 1\\)"),
                             ("validation_split", -0.1, "must be in \\[0, 1\\)"),
                             ("validate_every_n_steps", 0, "validate_every_n_steps = 0"),
                             ("max_validation_steps", 0, "max_validation_steps = 0")):
        with pytest.raises(ConfigError, match=f"{key}.*{text}" if key not in text else text):
            _config(tiny_sd1, dataset, tmp_path, **{key: value})


def test_validation_is_deterministic_and_leaves_training_unchanged(tiny_sd1, dataset, adapter, tmp_path):
    # latents encoded on the fly: the encoder's sampling must not shift the training RNG either
    plain = _config(tiny_sd1, dataset, tmp_path / "plain", validation_split=0.25, max_train_steps=4,
                    cache_latents=False)
    cfg = update_config(plain, {"output_dir": str(tmp_path / "a"), "validate_every_n_steps": 2,
                                "validate_every_n_epochs": 1, "logging_dir": str(tmp_path / "logs")})
    _, without, _ = _run(plain, adapter)
    trainer, first, events = _run(cfg, adapter)
    _, second, events_again = _run(update_config(cfg, {"output_dir": str(tmp_path / "b")}), adapter)

    assert first.losses == without.losses, "validation must not change what training draws"
    assert first.losses == second.losses
    validations = [e for e in events if isinstance(e, Validation)]
    assert validations == [e for e in events_again if isinstance(e, Validation)]
    # 7 training images, batch 1: epoch 1 ends at step 7 > 4, so validations follow steps 2 and 4 only
    assert [v.step for v in validations] == [2, 4]
    steps = [i for i, e in enumerate(events) if isinstance(e, Step)]
    assert events.index(validations[0]) == steps[1] + 1
    for v in validations:
        assert set(v.per_concept) == {"red", "green"} and math.isfinite(v.loss)
        assert v.loss == pytest.approx(sum(v.per_concept.values()) / 2)  # one held-out image per folder
    assert validations[0].loss != validations[1].loss, "training changes the validation loss"
    # the last validation (step 4) saw the weights of the final file; a network loaded from it has no dropout,
    # so equal figures show that dropout was off during validation
    saved = LoRANetwork.from_kohya(adapter.lora_targets(), load_lora(first.lora_path)[0])
    saved.apply()
    try:
        again = trainer.validator.evaluate(saved, trainer.text, trainer.precision, trainer.loss_options)
    finally:
        saved.remove()
    assert again.loss == pytest.approx(validations[-1].loss, rel=1e-5)
    assert trainer.network.training, "the network's mode is restored after validation"
    assert trainer.data.index.num_train_images == 7
    held = {i.path for i in trainer.validator.dataset.items}
    assert held.isdisjoint(i.path for i in trainer.data.dataset.items), "held-out images are not trained on"
    rows = list(csv.reader(next((tmp_path / "logs").glob("v_*")).joinpath("validation.csv").open()))
    assert rows[0] == ["step", "epoch", "loss", "loss_green", "loss_red"]
    assert [float(r[2]) for r in rows[1:]] == [v.loss for v in validations]


def test_epoch_validation_and_max_validation_steps(tiny_sd1, dataset, adapter, tmp_path):
    # no validate_every_n_*: after every epoch, as kohya does
    cfg = _config(tiny_sd1, dataset, tmp_path, validation_split=0.25, validation_seed=11, max_train_epochs=2,
                  max_train_steps=100, train_batch_size=7, max_validation_steps=1)
    _, result, events = _run(cfg, adapter)
    validations = [e for e in events if isinstance(e, Validation)]
    assert result.steps == 2 and [(v.step, v.epoch) for v in validations] == [(1, 1), (2, 2)]
    assert all(len(v.per_concept) == 1 for v in validations)


def test_job_status_keeps_the_validation_losses(tiny_sd1, dataset, tmp_path):
    from lora_trainer.host import StandaloneHost
    from lora_trainer.train.job import JobState, TrainingJob

    cfg = _config(tiny_sd1, dataset, tmp_path, diffusers_config_dir=str(tiny_sd1.config_dir),
                  tokenizer_dir=str(tiny_sd1.tokenizer_dir), validation_split=0.25, validate_every_n_steps=1,
                  max_train_steps=2)
    status = TrainingJob(cfg, StandaloneHost(tmp_path / "loras", device="cpu")).run()
    assert status.state is JobState.FINISHED
    assert [step for step, _ in status.validation_losses] == [1, 2]
    assert set(status.validation_per_concept) == {"red", "green"}
    data = status.to_dict()
    assert data["validation_losses"] == status.validation_losses and math.isfinite(data["validation_losses"][0][1])
    status.validation_losses.append((3, float("nan")))
    assert status.to_dict()["validation_losses"][-1] == (3, None)


def test_two_processes_report_the_validation_of_one(tiny_sd1, dataset, tmp_path):
    from test_distributed import TOTAL_BATCH, launch_two, write_config

    from lora_trainer.__main__ import main

    extra = "validation_split = 0.25\nvalidate_every_n_steps = 1\n"
    one = write_config(tmp_path / "one.toml", tiny_sd1, dataset, tmp_path / "one", TOTAL_BATCH)
    one.write_text(one.read_text(encoding="utf-8") + extra, encoding="utf-8")
    two = write_config(tmp_path / "two.toml", tiny_sd1, dataset, tmp_path / "two", TOTAL_BATCH // 2)
    two.write_text(two.read_text(encoding="utf-8") + extra, encoding="utf-8")
    assert main(["train", "--config", str(one), "--device", "cpu"]) == 0
    launch_two(two, tmp_path)

    def rows(run: str) -> list[list[str]]:
        (folder,) = (tmp_path / run / "logs").iterdir()
        return list(csv.reader((folder / "validation.csv").open(encoding="utf-8")))

    single, double = rows("one"), rows("two")
    assert single[0] == double[0] == ["step", "epoch", "loss", "loss_green", "loss_red"]
    # step 2 also ends epoch 1 (7 images, total batch 4): one validation there
    assert [r[0] for r in single[1:]] == [r[0] for r in double[1:]] == ["1", "2", "3"]
    for a, b in zip(single[1:], double[1:]):
        assert [float(x) for x in b[2:]] == pytest.approx([float(x) for x in a[2:]], rel=1e-5)
