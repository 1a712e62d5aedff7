"""The whole standalone app (`python -m lora_trainer ui`) built on whichever gradio is installed (3.41 as in
AUTOMATIC1111 and reForge, 4.x as in Forge), its main events run through gradio's own pre- and postprocessing:
what the page receives, without a server or a browser."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")

from lora_trainer.ui.app import create_app  # noqa: E402

from panel_events import PageSession  # noqa: E402


@pytest.fixture
def app(tmp_path):
    loras = tmp_path / "loras"
    loras.mkdir()
    blocks = create_app(lora_dir=loras)
    by_id = {block.elem_id: block for block in blocks.blocks.values() if getattr(block, "elem_id", None)}
    return PageSession(blocks), by_id, loras


def _is_update(value) -> bool:
    return isinstance(value, dict) and value.get("__type__") == "update"


def _choices(update: dict) -> list[str]:
    """An update's choices as values (gradio 4 sends [label, value] pairs, gradio 3 the values)."""
    return [c[1] if isinstance(c, (list, tuple)) else c for c in update["choices"]]


def _gallery_files(payload) -> list[str]:
    """Image paths of a Gallery as sent to the page (gradio 4: {"image": {"path"}}, gradio 3: [{"name"}, caption])."""
    files = []
    for item in payload:
        if isinstance(item, dict):
            files.append(item["image"]["path"])
        else:
            image = item[0] if isinstance(item, (list, tuple)) else item
            files.append(image["name"] if isinstance(image, dict) else image)
    return files


def test_every_component_argument_is_one_this_gradio_takes(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        create_app(lora_dir=tmp_path)
    # gradio only warns about an argument it does not take (gradio 4.40: LinePlot `width`), then ignores it
    assert not [str(w.message) for w in caught if "components" in Path(w.filename).parts]


def test_page_config_is_json_and_every_dropdown_shows_one_of_its_choices(app):
    page, by_id, _ = app
    blocks = page.blocks
    from gradio.routes import ORJSONResponse  # how the server sends the page its config

    config = json.loads(ORJSONResponse(blocks.get_config_file()).body)
    assert {"lt-tabs", "lt-ds-load", "lt-tr-start", "lt-te-render", "lt-tl-result"} <= \
        {c["props"].get("elem_id") for c in config["components"]}
    for block in blocks.blocks.values():
        if isinstance(block, gr.Dropdown) and block.value not in (None, "") and not block.allow_custom_value:
            # gradio 4 shows an empty field (and warns) for a value outside the choices
            choices = [c[1] if isinstance(c, (list, tuple)) else c for c in block.choices]
            assert block.value in choices, block.elem_id


def test_dataset_load_and_select_matching(app, make_dataset, tmp_path):
    page, c, _ = app
    root = make_dataset(tmp_path / "train")
    out = page.run(c["lt-ds-load"], values={c["lt-ds-folder"]: str(root)})
    assert out[c["lt-ds-status"]].startswith("Loaded 6 images")
    files = _gallery_files(out[c["lt-ds-gallery"]])
    assert len(files) == 6 and all(Path(f).is_file() for f in files)
    filter_update = out[c["lt-ds-folder-filter"]]
    assert _is_update(filter_update) and {"10_alice", "2_bob"} <= set(_choices(filter_update))

    out = page.run(c["lt-ds-select"], values={c["lt-ds-include"]: "hat"})  # the session's dataset
    assert out[c["lt-ds-status"]] == "Filter selected 2 of 6 images."
    assert len(_gallery_files(out[c["lt-ds-gallery"]])) == 2


def test_train_preset_export_and_bad_start(app, tmp_path):
    page, c, _ = app
    out = page.run(c["lt-tr-preset"], "change", values={c["lt-tr-preset"]: "sd1_style_lora"})
    assert out[c["lt-tr-network-dim"]] == 128 and out[c["lt-tr-optimizer-type"]] == "Lion"

    out = page.run(c["lt-tr-export"], values={c["lt-tr-folder"]: str(tmp_path / "train")})
    text, exported = out[c["lt-tr-toml-text"]], out[c["lt-tr-toml-file"]]
    assert "train_data_dir" in text
    path = exported["path"] if "path" in exported else exported["name"]  # gradio 4 FileData, gradio 3 dict
    assert Path(path).read_text(encoding="utf-8") == text

    out = page.run(c["lt-tr-start"], values={c["lt-tr-folder"]: str(tmp_path / "missing")})
    assert "does not exist" in out[c["lt-tr-message"]]


def test_tools_refresh_lists_new_files_and_test_panel_says_nothing_to_test(app):
    page, c, loras = app
    (loras / "new_lora.safetensors").write_bytes(b"")
    out = page.run(c["lt-tl-refresh"])
    lists = [v for v in out.values() if _is_update(v)]
    assert lists and any("new_lora.safetensors" in _choices(u) for u in lists)

    out = page.run(c["lt-te-load"])
    assert "Nothing to test yet" in out[c["lt-te-message"]]
