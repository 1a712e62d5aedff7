"""kohya dataset configs: reading ([general] -> [[datasets]] -> [[datasets.subsets]]), scanning, batches, errors."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from lora_trainer.config import (
    DatasetConfig, TrainConfig, apply_overrides, load_toml, read_dataset_config, save_toml,
)
from lora_trainer.data.folders import kohya_datasets, scan_dataset
from lora_trainer.data.loader import TrainDataset
from lora_trainer.errors import ConfigError, DatasetError

TWO_SUBSETS = """
[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1

[[datasets]]
resolution = 64
batch_size = 2

  [[datasets.subsets]]
  image_dir = "chars"
  num_repeats = 3
  class_tokens = "mychar"

  [[datasets.subsets]]
  image_dir = "reg"
  is_reg = true
  caption_extension = ".caption"
  keep_tokens = 0
  shuffle_caption = false
  class_tokens = "person"
  caption_prefix = "photo of"
"""


def _image(path: Path, seed: int, size=(64, 64)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (seed * 40 % 256, 90, 200)).save(path)


@pytest.fixture
def two_subsets(tmp_path) -> Path:
    """chars/: 3 captioned images (.txt); reg/: 2 with .caption files (and decoy .txt files), 1 without a caption."""
    for i in range(3):
        _image(tmp_path / "chars" / f"c{i}.png", i)
        (tmp_path / "chars" / f"c{i}.txt").write_text("mychar, red hair, smile, outdoors", encoding="utf-8")
    for i in range(3):
        _image(tmp_path / "reg" / f"r{i}.png", 10 + i)
        (tmp_path / "reg" / f"r{i}.txt").write_text("wrong extension", encoding="utf-8")
    for i in range(2):
        (tmp_path / "reg" / f"r{i}.caption").write_text("standing, plain", encoding="utf-8")
    path = tmp_path / "dataset.toml"
    path.write_text(TWO_SUBSETS, encoding="utf-8")
    return path


def test_two_subsets_scan_to_items_repeats_and_captions(two_subsets):
    index = scan_dataset(DatasetConfig(dataset_config=str(two_subsets)))
    train, reg = index.train_items, index.reg_items
    assert [(Path(i.path).name, i.repeats, i.caption) for i in train] == [
        (f"c{i}.png", 3, "mychar, red hair, smile, outdoors") for i in range(3)]
    # .caption files, not the .txt beside them; the image without one gets the subset's class_tokens
    assert [(Path(i.path).name, i.repeats, i.caption) for i in reg] == [
        ("r0.png", 1, "standing, plain"), ("r1.png", 1, "standing, plain"), ("r2.png", 1, "person")]
    assert index.num_train_images == 9 and index.num_reg_images == 3
    assert index.dirs == {"chars": {"n_repeats": 3, "img_count": 3}}  # kohya leaves reg subsets out
    assert index.tag_frequency["reg"] == {"standing": 2, "plain": 2, "person": 1}
    assert any("r2" not in p and "1 image(s) have no '.caption'" in p for p in index.problems)


def test_each_subset_processes_its_own_captions(two_subsets):
    index = scan_dataset(DatasetConfig(dataset_config=str(two_subsets), train_batch_size=5))
    dataset = TrainDataset(index, DatasetConfig(dataset_config=str(two_subsets)))
    assert len(dataset) == 18 and dataset.batches_per_epoch() == 9  # 9 train + 9 balanced reg; batch_size 2 wins
    orders, reg_captions = set(), Counter()
    for epoch in range(1, 5):
        for _, batch in dataset.iter_batches(epoch, seed=3):
            assert len(batch.captions) <= 2 and batch.pixels.shape[-2:] == (64, 64)
            for path, caption in zip(batch.paths, batch.captions):
                if "chars" in path:  # keep_tokens 1, the rest shuffled
                    tags = caption.split(", ")
                    assert tags[0] == "mychar" and sorted(tags[1:]) == ["outdoors", "red hair", "smile"]
                    orders.add(caption)
                else:  # keep_tokens 0, no shuffle, prefix
                    reg_captions[caption] += 1
    assert len(orders) > 1
    assert set(reg_captions) == {"photo of standing, plain", "photo of person"}
    assert dataset.fixed_captions() is None


def test_settings_inherit_general_then_dataset_then_subset_then_training_config(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    path = tmp_path / "d.toml"
    path.write_text("""
[general]
keep_tokens = 2
resolution = [64, 128]
caption_prefix = "art"

[[datasets]]
keep_tokens = 1
batch_size = 3
  [[datasets.subsets]]
  image_dir = "a"
  keep_tokens = 0
  [[datasets.subsets]]
  image_dir = "b"

[[datasets]]
enable_bucket = true
  [[datasets.subsets]]
  image_dir = "c"
  num_repeats = 5
  caption_prefix = "photo"
""", encoding="utf-8")
    fallback = DatasetConfig(train_batch_size=4, flip_aug=True, caption_extension=".cap", max_bucket_reso=512)
    first, second = read_dataset_config(path, fallback).datasets
    a, b = first.subsets
    (c,) = second.subsets
    assert (a.keep_tokens, b.keep_tokens, c.keep_tokens) == (0, 1, 2)
    assert (first.batch_size, second.batch_size) == (3, 4)  # the training config's train_batch_size is the fallback
    assert first.resolution == second.resolution == (64, 128)
    assert (first.enable_bucket, second.enable_bucket, second.max_bucket_reso) == (False, True, 512)
    assert (a.caption_prefix, c.caption_prefix) == ("art", "photo")
    assert all(s.flip_aug and s.caption_extension == ".cap" for s in (a, b, c))
    assert (a.num_repeats, c.num_repeats, a.is_reg, a.class_tokens) == (1, 5, False, None)
    assert a.image_dir == str(tmp_path / "a") and (a.dataset, c.dataset) == (0, 1)


def test_datasets_batch_with_their_own_resolution_and_batch_size(tmp_path):
    for i in range(4):
        _image(tmp_path / "small" / f"s{i}.png", i)
        _image(tmp_path / "tall" / f"t{i}.png", i, size=(64, 128))
    path = tmp_path / "d.toml"
    path.write_text("""
[[datasets]]
resolution = 64
batch_size = 4
  [[datasets.subsets]]
  image_dir = "small"
  class_tokens = "small"
[[datasets]]
resolution = [64, 128]
batch_size = 1
  [[datasets.subsets]]
  image_dir = "tall"
  class_tokens = "tall"
  num_repeats = 2
""", encoding="utf-8")
    cfg = DatasetConfig(dataset_config=str(path))
    index = scan_dataset(cfg)
    dataset = TrainDataset(index, cfg)
    assert dataset.batches_per_epoch() == 1 + 8
    shapes = Counter()
    for _, batch in dataset.iter_batches(1, seed=0):
        kinds = {Path(p).parent.name for p in batch.paths}
        assert len(kinds) == 1  # a batch never mixes datasets
        shapes[(kinds.pop(), tuple(batch.pixels.shape))] += 1
    assert shapes == {("small", (4, 3, 64, 64)): 1, ("tall", (1, 3, 128, 64)): 8}
    meta = dataset.datasets_metadata()
    assert [d["batch_size_per_device"] for d in meta] == [4, 1] and meta[1]["resolution"] == [64, 128]
    assert meta[1]["num_train_images"] == 8 and meta[1]["subsets"][0]["img_count"] == 4


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "imgs").mkdir(exist_ok=True)
    path = tmp_path / "d.toml"
    path.write_text(text, encoding="utf-8")
    return path


SUBSET = "[[datasets]]\n[[datasets.subsets]]\nimage_dir = \"imgs\"\n"
IN_SUBSET = "[[datasets.subsets]] #1"


@pytest.mark.parametrize("text, error, parts", [
    ("[[datasets]\n", ConfigError, ["not a valid dataset config"]),
    ("[general]\nkeep_tokens = 1\n", ConfigError, ["[[datasets]]", "no dataset"]),
    ("[[datasets]]\nresolution = 64\n", ConfigError, ["[[datasets]] #1", "no subset"]),
    ("[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n", ConfigError, [IN_SUBSET, "image_dir is missing"]),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = \"nowhere\"\n", FileNotFoundError,
     [IN_SUBSET, "image_dir 'nowhere' is not a folder"]),
    (SUBSET + "keep_tokens = \"many\"\n", ConfigError, [IN_SUBSET, "keep_tokens", "whole number"]),
    (SUBSET + "num_repeats = 0\n", ConfigError, [IN_SUBSET, "num_repeats = 0", "at least 1"]),
    (SUBSET + "caption_dropout_rate = 1.5\n", ConfigError, [IN_SUBSET, "caption_dropout_rate", "from 0 to 1"]),
    (SUBSET + "caption_extension = \"txt\"\n", ConfigError, [IN_SUBSET, "caption_extension", "'.'"]),
    ("[general]\nresolution = 100\n" + SUBSET, ConfigError, ["[general]", "resolution = 100", "multiples of 8"]),
    ("[general]\nbatch_size = 0\n" + SUBSET, ConfigError, ["[general]", "batch_size = 0", "from 1"]),
    ("[general]\nbucket_reso_steps = 12\n" + SUBSET, ConfigError, ["bucket_reso_steps", "multiple of 8"]),
    ("[general]\nmin_bucket_reso = 512\nmax_bucket_reso = 256\n" + SUBSET, ConfigError,
     ["[[datasets]] #1", "min_bucket_reso (512) is above max_bucket_reso (256)"]),
    ("[general]\nimage_dir = \"imgs\"\n" + SUBSET, ConfigError, ["[general]", "image_dir belongs in"]),
    ("[[datasets]]\nis_reg = true\n[[datasets.subsets]]\nimage_dir = \"imgs\"\n", ConfigError,
     ["[[datasets]] #1", "is_reg belongs in"]),
    (SUBSET + "resolution = 512\n", ConfigError, [IN_SUBSET, "resolution is a dataset key", "[[datasets]]"]),
    (SUBSET + "metadata_file = \"meta.json\"\n", ConfigError, [IN_SUBSET, "metadata_file", "not supported"]),
    (SUBSET + "conditioning_data_dir = \"cond\"\n", ConfigError, [IN_SUBSET, "conditioning_data_dir", "ControlNet"]),
    (SUBSET + "color_aug = true\n", ConfigError,
     [IN_SUBSET, "color_aug = True", "Remove color_aug or set it to false"]),
    (SUBSET + "face_crop_aug_range = [2.0, 4.0]\n", ConfigError,
     ["face_crop_aug_range", "Remove face_crop_aug_range."]),
    (SUBSET + "is_reg = true\n", ConfigError, ["every subset has is_reg = true"]),
])
def test_every_error_names_file_table_key_and_fix(tmp_path, text, error, parts):
    path = _write(tmp_path, text)
    with pytest.raises(error) as caught:
        read_dataset_config(path)
    message = str(caught.value)
    assert str(path) in message
    for part in parts:
        assert part in message


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset_config: file .*gone.toml' not found"):
        read_dataset_config(tmp_path / "gone.toml")


def test_unused_and_unknown_keys_are_reported_by_name(tmp_path):
    _image(tmp_path / "imgs" / "a.png", 1)
    path = _write(tmp_path, "[general]\ncolor_aug = false\nprior_loss_weight = 0.5\n" + SUBSET
                  + "num_repeat = 3\ncache_info = true\n")
    found = read_dataset_config(path)
    assert found.ignored_keys == {"[general] color_aug": "color augmentation is not supported",
                                  "[[datasets]] #1 > [[datasets.subsets]] #1 cache_info":
                                  "image sizes are read on every scan"}
    assert found.unknown_keys == ["[general] prior_loss_weight", f"[[datasets]] #1 > {IN_SUBSET} num_repeat"]
    assert "set it in the training config" in found.warnings[0] and "did you mean num_repeats" in found.warnings[1]
    assert found.subsets[0].num_repeats == 1
    problems = scan_dataset(DatasetConfig(dataset_config=str(path))).problems
    assert f"{path}: [general] color_aug: not used (color augmentation is not supported)." in problems
    assert any("unknown key 'num_repeat'" in p for p in problems)


def test_training_config_key_round_trips_and_overrides(tmp_path, two_subsets):
    train = tmp_path / "train.toml"
    train.write_text(f"dataset_config = '{two_subsets}'\ntrain_data_dir = '{tmp_path}'\n", encoding="utf-8")
    loaded = load_toml(train)
    assert loaded.config.dataset.dataset_config == str(two_subsets) and "dataset_config" not in loaded.ignored_keys
    again = load_toml(save_toml(loaded.config, tmp_path / "saved.toml")).config
    assert again == loaded.config
    assert apply_overrides(TrainConfig(), [f"dataset_config={two_subsets}"]).dataset.dataset_config == str(two_subsets)
    index = scan_dataset(loaded.config.dataset)
    assert any(p.startswith("train_data_dir: not used because dataset_config is set") for p in index.problems)
    assert len(index.items) == 6


def test_kohya_metadata_shape(two_subsets):
    index = scan_dataset(DatasetConfig(dataset_config=str(two_subsets)))
    (entry,) = json.loads(json.dumps(kohya_datasets(index)))
    assert entry["num_train_images"] == 9 and entry["num_reg_images"] == 3 and entry["resolution"] == [64, 64]
    chars, reg = entry["subsets"]
    assert chars == {"img_count": 3, "num_repeats": 3, "color_aug": False, "flip_aug": False, "random_crop": False,
                     "shuffle_caption": True, "keep_tokens": 1, "keep_tokens_separator": "",
                     "secondary_separator": None, "enable_wildcard": True, "caption_prefix": None,
                     "caption_suffix": None, "image_dir": "chars", "class_tokens": "mychar", "is_reg": False}
    assert (reg["is_reg"], reg["caption_prefix"], reg["keep_tokens"], reg["img_count"]) == (True, "photo of", 0, 3)
    assert set(entry["tag_frequency"]) == {"chars", "reg"}


def test_json_dataset_config_is_read_as_kohya_does(tmp_path):
    _image(tmp_path / "imgs" / "a.png", 1)
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"general": {"num_repeats": 4},
                                "datasets": [{"subsets": [{"image_dir": "imgs", "class_tokens": "thing"}]}]}))
    index = scan_dataset(DatasetConfig(dataset_config=str(path)))
    assert [(i.caption, i.repeats) for i in index.items] == [("thing", 4)]


def test_no_usable_image_in_any_subset_is_an_error(tmp_path):
    path = _write(tmp_path, SUBSET)
    with pytest.raises(DatasetError, match="no usable training image in the subsets"):
        scan_dataset(DatasetConfig(dataset_config=str(path)))
