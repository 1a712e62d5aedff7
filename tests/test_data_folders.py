"""Scanning dataset folders in kohya's `<repeats>_<concept>` layout."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from PIL import Image

from lora_trainer.data.folders import count_tags, scan_dataset
from lora_trainer.errors import DatasetError


def _img(path, size=(32, 24), color=(10, 20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


@pytest.fixture()
def dataset(tmp_path):
    root = tmp_path / "train"
    _img(root / "10_sks dog" / "a.png")
    (root / "10_sks dog" / "a.txt").write_text("sks dog, Grass, sitting", encoding="utf-8")
    _img(root / "10_sks dog" / "b.jpg", (24, 40))
    (root / "10_sks dog" / "b.txt").write_text("sks dog, grass", encoding="utf-8")
    _img(root / "10_sks dog" / "c.webp")  # no caption: concept words
    (root / "10_sks dog" / "broken.png").write_bytes(b"")
    (root / "10_sks dog" / "notes.md").write_text("ignored")
    noisy = Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48)
    noisy.save(root / "10_sks dog" / "full.jpg")
    data = (root / "10_sks dog" / "full.jpg").read_bytes()
    (root / "10_sks dog" / "full.jpg").unlink()
    (root / "10_sks dog" / "cut.jpg").write_bytes(data[: len(data) // 2])
    _img(root / "3_style" / "d.bmp")
    (root / "3_style" / "d.txt").write_bytes("caf\xe9, art".encode("latin-1"))
    _img(root / "misc" / "e.png")  # not <N>_<concept>
    _img(root / "loose.png")
    (root / ".cache").mkdir()
    return root


def test_scan_items_and_captions(dataset):
    index = scan_dataset(dataset)
    by_name = {item.path.split("/")[-1].split("\\")[-1]: item for item in index.items}
    assert sorted(by_name) == ["a.png", "b.jpg", "c.webp", "d.bmp"]
    assert by_name["a.png"].caption == "sks dog, Grass, sitting"
    assert by_name["a.png"].repeats == 10 and by_name["a.png"].concept == "sks dog"
    assert (by_name["b.jpg"].width, by_name["b.jpg"].height) == (24, 40)
    assert by_name["c.webp"].caption == "sks dog"
    assert by_name["d.bmp"].repeats == 3 and by_name["d.bmp"].caption.startswith("caf")
    assert "\ufffd" not in by_name["d.bmp"].caption
    assert not any(item.is_reg for item in index.items)
    assert index.num_train_images == 3 * 10 + 3


def test_scan_reports_problems_by_name(dataset):
    problems = "\n".join(scan_dataset(dataset).problems)
    assert "broken.png" in problems and "empty" in problems
    assert "cut.jpg" in problems and "truncated" in problems
    assert "misc" in problems and "<repeats>_<concept>" in problems
    assert "loose.png" in problems
    assert "d.txt" in problems and "not UTF-8" in problems
    assert "1 image(s) have no '.txt' caption" in problems
    assert ".cache" not in problems and "notes.md" not in problems


def test_tag_frequency_and_dirs_as_kohya(dataset):
    index = scan_dataset(dataset)
    assert index.tag_frequency["10_sks dog"] == {"sks dog": 3, "grass": 2, "sitting": 1}
    assert index.dirs == {"10_sks dog": {"n_repeats": 10, "img_count": 3}, "3_style": {"n_repeats": 3, "img_count": 1}}
    assert count_tags(["a, b, , A", "b"]) == {"a": 2, "b": 2}


def test_reg_data_dir_and_config_object(dataset, tmp_path):
    reg = tmp_path / "reg"
    _img(reg / "1_dog" / "r1.png")
    _img(reg / "1_dog" / "r2.png")
    cfg = SimpleNamespace(train_data_dir=str(dataset), caption_extension=".txt", reg_data_dir=str(reg))
    index = scan_dataset(cfg)
    assert len(index.reg_items) == 2 and all(i.caption == "dog" and i.is_reg for i in index.reg_items)
    assert index.reg_dirs == {"1_dog": {"n_repeats": 1, "img_count": 2}}
    assert index.num_reg_images == 2 and len(index.train_items) == 4


def test_caption_extension(tmp_path):
    root = tmp_path / "t"
    _img(root / "2_cat" / "a.png")
    (root / "2_cat" / "a.caption").write_text("a cat", encoding="utf-8")
    (root / "2_cat" / "a.txt").write_text("wrong", encoding="utf-8")
    assert scan_dataset(root, caption_extension=".caption").items[0].caption == "a cat"


def test_missing_or_empty_dataset_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="train_data_dir.*does not exist"):
        scan_dataset(tmp_path / "nope")
    (tmp_path / "empty" / "images").mkdir(parents=True)
    _img(tmp_path / "empty" / "images" / "x.png")
    with pytest.raises(DatasetError, match="no usable training image.*10_mychar.*images"):
        scan_dataset(tmp_path / "empty")
    concept = tmp_path / "ds" / "5_mychar"
    _img(concept / "y.png")
    with pytest.raises(DatasetError, match="looks like a concept folder.*parent folder"):
        scan_dataset(concept)
    with pytest.raises(DatasetError, match="reg_data_dir.*does not exist"):
        _img(tmp_path / "ok" / "1_a" / "x.png")
        scan_dataset(tmp_path / "ok", reg_data_dir=str(tmp_path / "noreg"))
