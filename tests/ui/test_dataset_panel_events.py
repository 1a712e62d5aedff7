"""The Dataset panel's wired events without a browser: what a click does with the controls as the page shows them."""
from __future__ import annotations

import re

import pytest

gr = pytest.importorskip("gradio")

from lora_trainer.data.captions import CaptionOptions  # noqa: E402
from lora_trainer.ui.dataset_panel import build_dataset_panel  # noqa: E402

from panel_events import run_event  # noqa: E402

LONG = "alice, 1girl, red hair, smile, hat, outdoors, sky, tree"


@pytest.fixture
def panel():
    with gr.Blocks() as blocks:
        panel = build_dataset_panel()
    return blocks, panel


def test_first_preview_after_load_uses_the_controls_as_shown(tmp_path, make_dataset, panel):
    blocks, p = panel
    root = make_dataset(tmp_path / "train", {"10_alice/a1": LONG})
    shown = {name: p.c[name].value for name in ("keep_tokens", "shuffle", "dropout")}
    assert shown["shuffle"] is True and shown["keep_tokens"] == 1  # what the page shows before any click

    out = run_event(blocks, p.c["load"], values={p.c["folder"]: str(root)})
    preview = out[p.c["preview"]]
    seed = int(re.search(r"\(seed (\d+)\)", preview).group(1))
    session = out[p.c["state"]]
    options = CaptionOptions(shuffle_caption=True, keep_tokens=1, caption_tag_dropout_rate=shown["dropout"])
    expected = session.editor.preview_caption(0, options, seed).caption
    assert preview.startswith(expected + "\n")
    assert session.caption_options == options


def test_load_takes_controls_changed_before_load(tmp_path, make_dataset, panel):
    blocks, p = panel
    root = make_dataset(tmp_path / "train", {"10_alice/a1": LONG})
    assert run_event(blocks, p.c["keep_tokens"], "change", {p.c["keep_tokens"]: 3}) == {}  # nothing loaded: quiet
    out = run_event(blocks, p.c["load"], values={p.c["folder"]: str(root), p.c["keep_tokens"]: 3,
                                                 p.c["shuffle"]: False})
    assert out[p.c["preview"]].startswith(LONG + "\n")  # no shuffle: the caption as written
    assert out[p.c["state"]].caption_options.keep_tokens == 3
