"""The folder rule of an exposed WebUI (`host/folder_policy.py`) and the policy the extension builds from the
WebUI's command line and settings (`a1111_tab.webui_folder_policy`)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from lora_trainer.host.a1111_tab import webui_folder_policy
from lora_trainer.host.folder_policy import SETTING_KEY, FolderPolicy, PathNotAllowedError, is_exposed, split_folders


def _opts(**flags):
    base = dict(share=False, listen=False, ngrok=None, server_name=None, enable_insecure_extension_access=False)
    return SimpleNamespace(**dict(base, **flags))


@pytest.mark.parametrize("flags, exposed", [
    ({}, False),
    ({"listen": True}, True),
    ({"share": True}, True),
    ({"server_name": "0.0.0.0"}, True),
    ({"ngrok": "token"}, True),
    ({"listen": True, "enable_insecure_extension_access": True}, False),
    ({"enable_insecure_extension_access": True}, False),
])
def test_exposed_follows_the_webuis_rule_for_extension_access(flags, exposed):
    assert is_exposed(_opts(**flags)) is exposed


def test_the_webuis_own_verdict_wins_when_it_set_one():
    assert is_exposed(_opts(listen=True, disable_extension_access=False)) is False
    assert is_exposed(_opts(disable_extension_access=True)) is True


def test_the_setting_takes_one_folder_per_line_or_semicolons():
    assert split_folders(" /a/b \n\n/c d;/e\n") == ["/a/b", "/c d", "/e"]
    assert split_folders(None) == [] and split_folders("") == []


def test_paths_resolve_before_they_are_judged(tmp_path, monkeypatch):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (outside / "back").symlink_to(root / "sub", target_is_directory=True)
    policy = FolderPolicy.build(True, [root, None, ""])
    assert policy.allows(root) and policy.allows(root / "sub" / "new" / "file.toml")
    assert policy.allows(outside / "back" / "x")  # a link that leads inside is inside
    for path in (outside, root / "escape", root / "escape" / "x", root / "sub" / ".." / ".." / "outside",
                 str(root) + "2", "/", "relative/path", "a\0b"):
        assert not policy.allows(path), path
    monkeypatch.chdir(root)
    assert policy.allows("sub/x") and not policy.allows("../outside")
    monkeypatch.setenv("HOME", str(outside))
    assert not policy.allows("~/x")  # read literally it is inside, expanded it is not: refused
    assert FolderPolicy().allows("/anything") and FolderPolicy.build(False, []).allows("/anything")


def test_the_refusal_names_the_key_and_the_setting_but_not_the_path(tmp_path):
    policy = FolderPolicy.build(True, [tmp_path / "root"])
    with pytest.raises(PathNotAllowedError) as info:
        policy.check("output_dir", "/srv/secret/place")
    assert info.value.status == 403
    message = str(info.value)
    assert message.startswith("output_dir: ") and "Settings > LoRA Trainer" in message
    assert "/srv" not in message and str(tmp_path) not in message


def test_the_extension_allows_the_webuis_folders_and_its_settings(tmp_path):
    folders = {name: tmp_path / name for name in ("models", "data", "lora", "ckpt", "out", "extra1", "extra2")}
    shared = SimpleNamespace(
        models_path=str(folders["models"]), data_path=str(folders["data"]),
        cmd_opts=_opts(listen=True, lora_dir=str(folders["lora"]), ckpt_dir=str(folders["ckpt"])),
        opts=SimpleNamespace(data={"lora_trainer_output_dir": str(folders["out"]),
                                   SETTING_KEY: f"{folders['extra1']}\n{folders['extra2']}"}))
    policy = webui_folder_policy(shared)
    assert policy.restricted
    for folder in folders.values():
        assert policy.allows(folder / "x"), folder
    assert not policy.allows(tmp_path / "other")
    shared.cmd_opts = _opts(ckpt_dir=None)
    assert not webui_folder_policy(shared).restricted


def test_a_dataset_config_inside_may_not_point_its_subsets_outside(tmp_path):
    from lora_trainer.config import TrainConfig, update_config

    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "img").mkdir(parents=True)
    outside.mkdir()
    policy = FolderPolicy.build(True, [allowed])
    good = allowed / "good.toml"
    good.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "img"\n', encoding="utf-8")
    policy.check_config(update_config(TrainConfig(), {"dataset_config": str(good)}))  # relative, beside the file
    for image_dir in (str(outside / "secret"), "../outside"):  # absolute, and relative climbing out
        bad = allowed / "bad.toml"
        bad.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{image_dir}"\n', encoding="utf-8")
        with pytest.raises(PathNotAllowedError, match="dataset_config image_dir") as caught:
            policy.check_config(update_config(TrainConfig(), {"dataset_config": str(bad)}))
        assert str(outside) not in str(caught.value) and "secret" not in str(caught.value)
