"""The ONNX tagger end to end on tiny designed models run by the real onnxruntime (see lora_trainer/testing)."""
from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_trainer.errors import DatasetError, TaggerError
from lora_trainer.progress import CancelToken
from lora_trainer.tagging.caption_store import BACKUP_DIR
from lora_trainer.tagging.tag_format import TagOptions
from lora_trainer.tagging.tagger import TaggerModel, prepare_image, tag_folder
from lora_trainer.tagging.tagger_models import download_model, find_models
from lora_trainer.testing.tiny_tagger import TINY_TAGS, build_tiny_tagger, write_tags_csv

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("taggers")
    return {"dynamic": build_tiny_tagger(root / "dynamic"), "fixed": build_tiny_tagger(root / "fixed", batch=1)}


@pytest.fixture(scope="module")
def tagger(models):
    return TaggerModel(models["dynamic"])


def _save(folder: Path, name: str, color, size=(48, 64), mode="RGB") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    Image.new(mode, size, color).save(path)
    return path


def _noise_images(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(24, 96, 2))
        path = folder / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _caption(path: Path) -> str:
    return path.with_suffix(".txt").read_text(encoding="utf-8")


# --- preprocessing ---------------------------------------------------------------------------------------------

def test_prepare_pads_centered_with_white_and_gives_bgr():
    arr = prepare_image(Image.new("RGB", (20, 40), RED), 448)
    assert arr.shape == (448, 448, 3) and arr.dtype == np.float32
    assert np.all(arr[:, :100] == 255) and np.all(arr[:, -100:] == 255)  # 10 px of 40 each side -> 112 of 448
    assert arr[224, 224].tolist() == [0.0, 0.0, 255.0]  # red in BGR order
    np.testing.assert_allclose(arr, arr[:, ::-1], atol=1e-3)  # padding is centered
    wide = prepare_image(Image.new("RGB", (40, 20), BLUE), 448)
    assert np.all(wide[:100] == 255) and np.all(wide[-100:] == 255)
    assert wide[224, 224].tolist() == [255.0, 0.0, 0.0]


def test_prepare_composites_alpha_on_white_and_keeps_exact_pixels_at_model_size():
    im = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    im.paste((255, 0, 0, 255), (8, 8, 24, 24))
    arr = prepare_image(im, 32)
    assert arr[0, 0].tolist() == [255.0, 255.0, 255.0]  # transparent black -> white, not black
    assert arr[16, 16].tolist() == [0.0, 0.0, 255.0]
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(prepare_image(Image.fromarray(rgb), 64), rgb[:, :, ::-1].astype(np.float32))


def test_designed_tags_confirm_channel_order_end_to_end(tagger):
    red, blue, green, white = tagger.tag_images([Image.new("RGB", (40, 40), c) for c in (RED, BLUE, GREEN, WHITE)])
    assert "red_theme" in red.general and "blue_theme" not in red.general
    assert "blue_theme" in blue.general and "red_theme" not in blue.general
    assert list(green.character) == ["hatsune_miku"] and list(blue.character) == ["saber_(fate)"]
    assert "white_background" in white.general and "white_background" not in red.general


def test_large_jpegs_are_drafted_close_to_a_full_decode(tmp_path):
    from lora_trainer.tagging.tagger_input import load_for_tagging

    rng = np.random.default_rng(3)
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    path = tmp_path / "big.jpg"
    image = Image.fromarray(small).resize((128, 96), Image.Resampling.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated to portrait
    image.save(path, quality=95, exif=exif)
    drafted, full = load_for_tagging(path, 32, draft=True), load_for_tagging(path, 32)
    assert full.size == (96, 128) and drafted.size == (48, 64)  # rotated; half scale keeps >= 1.5 x 32
    diff = np.abs(prepare_image(drafted, 32) - prepare_image(full, 32))
    assert diff.mean() < 2.0 and diff.max() < 12
    assert load_for_tagging(path, 64, draft=True).size == (96, 128)  # 128 < 2 x 1.5 x 64: full decode
    (tmp_path / "cut.jpg").write_bytes(path.read_bytes()[:300])
    with pytest.raises(DatasetError, match="cut.jpg"):
        load_for_tagging(tmp_path / "cut.jpg", 32, draft=True)
    model = TaggerModel(build_tiny_tagger(tmp_path / "small", size=32))
    summary = tag_folder(tmp_path, model, jpeg_draft=True)
    assert summary.tagged == 1 and [p.name for p, _ in summary.failed] == ["cut.jpg"]


# --- model loading -------------------------------------------------------------------------------------------------

def test_model_shape_provider_and_log(models, caplog):
    with caplog.at_level(logging.INFO, logger="lora_trainer.tagging.tagger"):
        dynamic = TaggerModel(models["dynamic"])
    assert "running on CPUExecutionProvider" in caplog.text
    assert dynamic.provider == "CPUExecutionProvider"
    assert dynamic.input_size == 448 and dynamic.fixed_batch is None
    assert TaggerModel(models["fixed"]).fixed_batch == 1
    assert dynamic.default_threshold == pytest.approx(0.35)


def test_cuda_request_without_a_cuda_onnxruntime_warns_and_runs_on_cpu(models, caplog):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with caplog.at_level(logging.WARNING, logger="lora_trainer.tagging.tagger"):
        model = TaggerModel(models["dynamic"], device="cuda")
    assert model.provider == "CPUExecutionProvider"
    assert "onnxruntime-gpu" in caplog.text
    with pytest.raises(ValueError, match="device"):
        TaggerModel(models["dynamic"], device="gpu")


def test_categories_come_from_the_csv_not_row_order(tagger, tmp_path):
    names = tagger.labels.names
    assert sorted(names[i] for i in tagger.labels.rating) == ["explicit", "general", "questionable", "sensitive"]
    assert sorted(names[i] for i in tagger.labels.character) == ["hatsune_miku", "saber_(fate)"]
    # Same model, but the csv marks "1girl" as a character: it must then follow the character threshold.
    folder = build_tiny_tagger(tmp_path / "recat")
    write_tags_csv(folder / "selected_tags.csv", [(n, 4 if n == "1girl" else c) for n, c, _, _ in TINY_TAGS])
    image = Image.new("RGB", (32, 32), WHITE)
    scores = TaggerModel(folder).tag_images([image], TagOptions(character_threshold=0.95))[0]
    assert "1girl" in tagger.tag_images([image])[0].general  # p = 0.88
    assert "1girl" not in scores.general and "1girl" not in scores.character


def test_known_model_folder_gets_its_pr_threshold(tmp_path):
    model = TaggerModel(build_tiny_tagger(tmp_path / "wd-vit-tagger-v3"))
    assert model.default_threshold == pytest.approx(0.2614)
    probs = model.predict(prepare_image(Image.new("RGB", (32, 32), WHITE), 448)[None])[0]
    general = model.scores(probs, TagOptions()).general
    expected = {model.labels.names[i] for i in model.labels.general if probs[i] > 0.2614}
    assert set(general) == expected and any(0.2614 < probs[i] <= 0.35 for i in model.labels.general)


def test_missing_csv_or_wrong_output_count_is_a_clear_error(tmp_path):
    no_csv = build_tiny_tagger(tmp_path / "wd-vit-tagger-v3", write_csv=False)
    with pytest.raises(TaggerError, match=r"selected_tags\.csv missing.*--download wd-vit-tagger-v3") as err:
        TaggerModel(no_csv)
    assert str(no_csv) in str(err.value)
    wrong = build_tiny_tagger(tmp_path / "wrong", num_outputs=10)
    with pytest.raises(TaggerError, match=f"gives 10 outputs but selected_tags.csv lists {len(TINY_TAGS)} tags"):
        TaggerModel(wrong)
    with pytest.raises(TaggerError, match="not found"):
        TaggerModel(tmp_path / "nowhere")


def test_a_failing_session_run_is_a_tagger_error(tagger):
    with pytest.raises(TaggerError, match=r"(?s)model\.onnx: running the model on 2 image.*Lower the batch size"):
        tagger.predict(np.zeros((2, 32, 32, 3), np.float32))


def test_find_models_lists_ready_and_incomplete_folders(tmp_path):
    build_tiny_tagger(tmp_path / "b_ready")
    build_tiny_tagger(tmp_path / "a_broken", write_csv=False)
    (tmp_path / "not_a_model").mkdir()
    found = find_models(tmp_path)
    assert [(m.name, m.ready) for m in found] == [("a_broken", False), ("b_ready", True)]
    assert "selected_tags.csv missing" in found[0].problem
    assert find_models(tmp_path / "missing") == []


def test_download_refuses_unknown_names_and_reports_failures(tmp_path, monkeypatch):
    with pytest.raises(TaggerError, match="not a known tagger model.*wd-vit-tagger-v3"):
        download_model("wd-nonexistent-v9", tmp_path)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as with HF_HUB_OFFLINE=1
    with pytest.raises(TaggerError, match="download .* failed.*by hand") as err:
        download_model("wd-vit-tagger-v3", tmp_path)
    assert str(tmp_path / "wd-vit-tagger-v3") in str(err.value)


# --- tagging folders -----------------------------------------------------------------------------------------------

def test_batching_gives_the_same_captions_as_one_by_one(models, tmp_path):
    paths = _noise_images(tmp_path / "imgs", 7)
    arrays = np.stack([prepare_image(Image.open(p), 448) for p in paths])
    one = TaggerModel(models["fixed"])
    dyn = TaggerModel(models["dynamic"])
    np.testing.assert_allclose(dyn.predict(arrays), one.predict(arrays), atol=1e-5)
    captions = {}
    for name, model, batch in [("fixed", one, 8), ("b1", dyn, 1), ("b3", dyn, 3)]:
        summary = tag_folder(paths, model, TagOptions(existing="overwrite", general_threshold=0.5), batch_size=batch)
        assert summary.tagged == 7 and not summary.failed
        captions[name] = [_caption(p) for p in paths]
    np.testing.assert_allclose(TaggerModel(build_tiny_tagger(tmp_path / "fixed2", batch=2)).predict(arrays),
                               one.predict(arrays), atol=1e-5)  # 7 = 2 + 2 + 2 + a padded last call
    assert captions["fixed"] == captions["b1"] == captions["b3"]
    assert len(set(captions["b3"])) > 1  # images differ, so a shuffled batch would show


def _bomb_png(path: Path, side: int = 60000) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10))
                     + chunk(b"IEND", b""))


def test_bad_images_are_reported_and_the_rest_tagged(tagger, tmp_path):
    good = [_save(tmp_path, "a.png", RED), _save(tmp_path, "z.jpg", GREEN)]
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "cut.png").write_bytes(good[0].read_bytes()[:70])
    _bomb_png(tmp_path / "huge.png")
    summary = tag_folder(tmp_path, tagger, batch_size=2)
    assert summary.tagged == 2 and summary.provider == "CPUExecutionProvider" and summary.seconds > 0
    failed = {p.name: reason for p, reason in summary.failed}
    assert set(failed) == {"empty.png", "text.png", "cut.png", "huge.png"}
    assert all(name in reason for name, reason in failed.items())
    assert "0 bytes" in failed["empty.png"] and "large" in failed["huge.png"]
    assert "red theme" in _caption(good[0]) and "hatsune miku" in _caption(good[1])
    assert sorted(p.name for p in tmp_path.glob("*.txt")) == ["a.txt", "z.txt"]


def test_transparent_png_file_is_tagged_on_white(tagger, tmp_path):
    path = _save(tmp_path, "t.png", (0, 0, 0, 0), size=(40, 40), mode="RGBA")
    tag_folder(tmp_path, tagger, TagOptions(general_threshold=0.9))
    assert "white background" in _caption(path)


@pytest.mark.parametrize("mode", ["skip", "overwrite", "append", "prepend"])
def test_existing_caption_modes_on_disk(tagger, tmp_path, mode):
    image = _save(tmp_path, "a.png", RED)
    _save(tmp_path, "new.png", RED)
    image.with_suffix(".txt").write_text("old tag, red theme", encoding="utf-8")
    opts = TagOptions(existing=mode, general_threshold=0.9, trigger_tags=("mychar",))
    summary = tag_folder(tmp_path, tagger, opts)
    expected = {"skip": "old tag, red theme", "overwrite": "mychar, red theme",
                "append": "mychar, old tag, red theme", "prepend": "mychar, red theme, old tag"}[mode]
    assert _caption(image) == expected
    assert _caption(tmp_path / "new.png") == "mychar, red theme"
    assert (summary.tagged, summary.skipped) == ((1, 1) if mode == "skip" else (2, 0))
    backup = tmp_path / BACKUP_DIR / "a.txt"
    assert backup.exists() == (mode != "skip")


def test_non_utf8_caption_is_not_merged(tagger, tmp_path):
    image = _save(tmp_path, "a.png", RED)
    image.with_suffix(".txt").write_bytes("caf\xe9".encode("latin-1"))
    summary = tag_folder(tmp_path, tagger, TagOptions(existing="append"))
    assert summary.tagged == 0 and "not UTF-8" in summary.failed[0][1]
    assert image.with_suffix(".txt").read_bytes() == "caf\xe9".encode("latin-1")
    assert tag_folder(tmp_path, tagger, TagOptions(existing="overwrite")).tagged == 1


def test_extension_recursion_and_hidden_folders(tagger, tmp_path):
    top = _save(tmp_path, "a.png", BLUE)
    sub = _save(tmp_path / "10_char", "b.png", BLUE)
    _save(tmp_path / ".hidden", "c.png", BLUE)
    assert tag_folder(tmp_path, tagger, TagOptions(caption_extension="caption")).tagged == 1
    assert top.with_suffix(".caption").exists() and not top.with_suffix(".txt").exists()
    assert tag_folder(tmp_path, tagger, recursive=True).tagged == 2
    assert sub.with_suffix(".txt").exists() and not (tmp_path / ".hidden" / "c.txt").exists()
    with pytest.raises(TaggerError, match="folder not found"):
        tag_folder(tmp_path / "nope", tagger)


def test_progress_and_cancel(tagger, tmp_path):
    paths = _noise_images(tmp_path, 6)
    seen = []
    tag_folder(paths, tagger, batch_size=2, progress=seen.append)
    assert [i.done for i in seen] == [2, 4, 6] and seen[-1].total == 6 and seen[-1].eta_s == 0
    token = CancelToken()

    def stop_after_first(info):
        token.cancel()

    for p in paths:
        p.with_suffix(".txt").unlink()
    summary = tag_folder(paths, tagger, batch_size=2, progress=stop_after_first, cancel=token)
    assert summary.cancelled and summary.tagged == 2
    assert sum(p.with_suffix(".txt").exists() for p in paths) == 2


# --- CLI -----------------------------------------------------------------------------------------------------------

def test_cli_tags_a_folder(models, tmp_path, capsys):
    from lora_trainer.__main__ import main

    image = _save(tmp_path / "data", "a.png", RED)
    (tmp_path / "data" / "bad.png").write_bytes(b"")
    rc = main(["tag", str(tmp_path / "data"), "--model-dir", str(models["fixed"]), "--trigger", "mychar, style",
               "--threshold", "0.9", "--rating", "--exclude", "1girl"])
    out = capsys.readouterr()
    assert rc == 1  # one image failed
    assert _caption(image) == "mychar, style, general, red theme"
    assert "tagged 1, skipped 0 (caption kept), failed 1" in out.out and "bad.png" in out.out
    assert "2/2" in out.err and "img/s" in out.err
    rc = main(["tag", str(tmp_path / "data"), "--tagger-dir", str(tmp_path / "models"), "--model", "missing"])
    assert rc == 2 and "tagger model folder not found" in capsys.readouterr().err


def test_cli_flags_map_to_options_and_model_choice(tmp_path, capsys):
    import argparse

    from lora_trainer.__main__ import main
    from lora_trainer.cli import tag as tag_cli

    parser = argparse.ArgumentParser()
    tag_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["tag", "--mcut", "--trigger", "a,b", "--trigger", "c", "d", "--append",
                              "--existing", "prepend", "--exclude", "x_y", "--no-underscore-replace", "--escape",
                              "--sort", "alpha", "--ext", "caption", "--no-characters", "--keep-duplicates"])
    opts = tag_cli._options(args)
    assert (opts.general_mcut, opts.character_mcut, opts.trigger_tags, opts.trigger_position) == \
        (True, True, ("a", "b", "c"), "append")
    assert (opts.existing, opts.exclude_tags, opts.replace_underscores, opts.escape_parentheses, opts.sort) == \
        ("prepend", ("x_y",), False, True, "alpha")
    assert (opts.caption_extension, opts.include_characters, opts.remove_duplicates) == (".caption", False, False)
    assert args.dir == Path("d")
    opts = tag_cli._options(parser.parse_args(["tag", "d", "--character-mcut"]))
    assert (opts.general_mcut, opts.character_mcut) == (False, True)
    # --download of a model that is already there uses it without going online; a lone model is picked by itself.
    build_tiny_tagger(tmp_path / "models" / "wd-vit-tagger-v3")
    image = _save(tmp_path / "data", "a.png", GREEN)
    for extra in (["--download", "wd-vit-tagger-v3"], []):
        rc = main(["tag", str(tmp_path / "data"), "--tagger-dir", str(tmp_path / "models"), "--existing",
                   "overwrite", *extra])
        assert rc == 0, capsys.readouterr().err
        assert "hatsune miku" in _caption(image)
        assert "wd-vit-tagger-v3" in capsys.readouterr().err
