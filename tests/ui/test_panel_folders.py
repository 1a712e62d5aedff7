"""The panels on a WebUI that listens on the network: every action that takes a path follows the host's folder
rule (the API's), refusing with the setting's name and never the path; standalone nothing is restricted.
Run through the wired handlers without a browser."""
from __future__ import annotations

import pytest

gr = pytest.importorskip("gradio")

from lora_trainer.host import StandaloneHost  # noqa: E402
from lora_trainer.host.folder_policy import SETTING_KEY, FolderPolicy  # noqa: E402
from lora_trainer.ui.app import build_tab  # noqa: E402

from panel_events import run_event  # noqa: E402

REFUSAL = "Settings > LoRA Trainer"


@pytest.fixture
def places(tmp_path, make_dataset):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    make_dataset(allowed / "train", {"10_a/a1": "a, b"})
    make_dataset(outside / "secret_train", {"10_a/a1": "a, b"})
    (outside / "secret_taggers" / "some-model").mkdir(parents=True)
    return allowed, outside


def _tab(tmp_path, policy):
    with gr.Blocks() as blocks:
        tab = build_tab(StandaloneHost(tmp_path / "loras"), folder_policy=policy)
    return blocks, tab


def _refused(text: str, outside) -> None:
    assert REFUSAL in text and SETTING_KEY not in text  # the setting by its label
    assert str(outside) not in text and "secret" not in text


def test_dataset_panel_refuses_folders_outside(tmp_path, places):
    allowed, outside = places
    blocks, tab = _tab(tmp_path, lambda: FolderPolicy.build(True, [allowed]))
    c = tab.dataset.c
    out = run_event(blocks, c["load"], values={c["folder"]: str(outside / "secret_train")})
    _refused(out[c["status"]], outside)
    assert c["gallery"] not in out
    out = run_event(blocks, c["load"], values={c["folder"]: str(allowed / "train")})
    assert out[c["status"]].startswith("Loaded 1 images")

    tagged = list(run_event(blocks, c["run"], values={c["folder"]: str(outside / "secret_train"),
                                                      c["tagger_dir"]: str(allowed)}))
    _refused(tagged[-1][c["tag_status"]], outside)
    tagged = list(run_event(blocks, c["run"], values={c["folder"]: str(allowed / "train"),
                                                      c["tagger_dir"]: str(outside / "secret_taggers")}))
    _refused(tagged[-1][c["tag_status"]], outside)
    models, note = run_event(blocks, c["refresh"], values={c["tagger_dir"]: str(outside / "secret_taggers")})
    _refused(note, outside)
    assert "some-model" not in str(models) and "some-model" not in note


def test_dataset_panel_checks_the_rule_again_before_writing(tmp_path, places):
    allowed, outside = places
    rule = {"roots": [allowed]}
    blocks, tab = _tab(tmp_path, lambda: FolderPolicy.build(True, rule["roots"]))
    c = tab.dataset.c
    session = run_event(blocks, c["load"], values={c["folder"]: str(allowed / "train")})[c["state"]]
    rule["roots"] = [outside]  # the owner narrowed the setting while the page was open
    out = run_event(blocks, c["save"], values={c["state"]: session})
    assert REFUSAL in out[c["status"]] and str(allowed) not in out[c["status"]]


def test_train_panel_refuses_configs_naming_outside_paths(tmp_path, places):
    allowed, outside = places
    blocks, tab = _tab(tmp_path, FolderPolicy.build(True, [allowed]))
    c = tab.train.c
    form = {field: getattr(field, "value", None) for field in tab.train.form}
    start = run_event(blocks, c["start"], values={**form, c["folder"]: str(outside / "secret_train")})
    _refused(start, outside)
    resume = run_event(blocks, c["resume"], values={**form, c["folder"]: str(allowed / "train"),
                                                    c["resume_dir"]: str(outside / "secret-state")})
    _refused(resume, outside)
    text = f'train_data_dir = "{allowed / "train"}"\noutput_dir = "{outside / "secret_out"}"\n'
    imported = run_event(blocks, c["import"], values={c["toml_text"]: text})
    _refused(imported[-1], outside)
    weights = {**form, c["network_weights"]: str(outside / "secret.safetensors")}
    exported = run_event(blocks, c["export"], values={**weights, c["folder"]: str(allowed / "train")})
    _refused(exported[-1], outside)
    assert not tab.manager.status().state.active  # nothing started


def test_train_panel_allows_folders_inside_and_its_own_prompt_file(tmp_path, places):
    allowed, _ = places
    blocks, tab = _tab(tmp_path, FolderPolicy.build(True, [allowed]))
    c = tab.train.c
    values = {c["folder"]: str(allowed / "train"), c["output_dir"]: str(allowed / "out"),
              c["sample_prompts"]: "a red square\na blue square"}  # written to the panel's own prompts folder
    text, path, message = run_event(blocks, c["export"], values=values)
    assert message.startswith("Exported") and f'output_dir = "{allowed / "out"}"' in text


def test_standalone_allows_every_folder(tmp_path, places):
    _, outside = places
    blocks, tab = _tab(tmp_path, None)
    c = tab.dataset.c
    out = run_event(blocks, c["load"], values={c["folder"]: str(outside / "secret_train")})
    assert out[c["status"]].startswith("Loaded 1 images")


def test_a_browser_sees_the_refusal_and_not_the_path(browser, tmp_path, places):
    from playwright.sync_api import expect

    from lora_trainer.ui import compat

    allowed, outside = places
    with gr.Blocks(analytics_enabled=False) as app:
        build_tab(StandaloneHost(tmp_path / "loras"), folder_policy=FolderPolicy.build(True, [allowed]))
    compat.enable_queue(app, 4)
    app.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = context.new_page()
        page.goto(app.local_url)
        page.locator("#lt-ds-folder textarea").fill(str(outside / "secret_train"))
        page.locator("#lt-ds-load").click()
        status = page.locator("#lt-ds-status").first
        expect(status).to_contain_text("Settings > LoRA Trainer", timeout=20000)
        assert "secret" not in status.inner_text()
        page.locator("#lt-ds-folder textarea").fill(str(allowed / "train"))
        page.locator("#lt-ds-load").click()
        expect(status).to_contain_text("Loaded 1 images", timeout=20000)
    finally:
        context.close()
        compat.close_now(app)
