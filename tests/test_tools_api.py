"""The tool routes over HTTP (FastAPI's TestClient, the routes registered as the extension does, the standalone
host with a Lora and a Stable-diffusion folder): previews write nothing, jobs write into the host's folders and
refresh its Lora list, every bad body is a 4xx naming the field, and on an exposed WebUI every input and output
path goes through the folder rule."""
from __future__ import annotations

import shutil
import threading

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from lora_trainer.host import StandaloneHost
from lora_trainer.host.folder_policy import FolderPolicy
from lora_trainer.host.tools_api import PREFIX, ToolsApi
from lora_trainer.testing.lora_files import random_lora, tiny_targets
from lora_trainer.tools import inspect_lora
from lora_trainer.ui.tools_actions import ToolCancelled, ToolProgress
from lora_trainer.ui.tools_ckpt_actions import Tools
from lora_trainer.ui.tools_views import TITLES, report_markdown


class CountingHost(StandaloneHost):
    """The standalone host, counting Lora list refreshes (the WebUI reloads its list there)."""

    refreshes = 0

    def refresh_loras(self) -> None:
        self.refreshes += 1


@pytest.fixture(scope="module")
def sources(tiny_sd1, tmp_path_factory):
    """Two LoRAs (ranks 4 and 2) on the tiny SD1 model and its checkpoint, built once."""
    root = tmp_path_factory.mktemp("tools_api_sources")
    targets = tiny_targets(tiny_sd1)
    random_lora(targets, root / "a.safetensors", seed=1)
    random_lora(targets, root / "b.safetensors", seed=2, dim=2)
    return root


@pytest.fixture
def folders(sources, tiny_sd1, tmp_path):
    loras, checkpoints = tmp_path / "Lora", tmp_path / "Stable-diffusion"
    loras.mkdir()
    checkpoints.mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        shutil.copy(sources / name, loras / name)
    shutil.copy(tiny_sd1.checkpoint, checkpoints / "base.safetensors")
    return loras, checkpoints


@pytest.fixture
def host(folders):
    return CountingHost(folders[0], device="cpu", models_dir=folders[1])


def _client(host, policy=None) -> TestClient:
    app = FastAPI()
    ToolsApi(Tools(host), folder_policy=(lambda: policy) if policy else None).register(app)
    return TestClient(app)


def _post(client, tool, body, status=200):
    response = client.post(f"{PREFIX}/{tool}", json=body)
    assert response.status_code == status, response.text
    answer = response.json()
    if status == 200:  # the panel shows the same report: every figure it reads is there
        text = report_markdown(answer)
        head = text.split("\n")[0]
        assert head.startswith(f"**{TITLES[tool]}") and (": written**" in head) == bool(answer["written"])
    return answer


def test_previews_report_and_write_nothing(host, folders):
    client = _client(host)
    before = sorted(p.name for folder in folders for p in folder.iterdir())
    lbw = _post(client, "lbw", {"file": "a.safetensors", "weights": "OUTD"})
    assert lbw["preview"] and lbw["written"] is None and lbw["architecture"] == "sd1"
    assert lbw["blocks"]["OUT03"] == {"modules": 12, "weight": 1.0} and lbw["blocks"]["IN01"]["weight"] == 0.0
    merge = _post(client, "merge", {"loras": {"a.safetensors": 1.0, "b.safetensors": 1.0}, "rank": 2})
    assert merge["mode"] == "svd" and merge["ranks"] == [2] and 0.3 < merge["retained_overall"] < 1.0
    assert set(merge["retained_by_block"]) >= {"BASE", "M00", "OUT11"}
    resize = _post(client, "resize", {"file": "a.safetensors", "rank": 2})
    assert resize["rank_changes"] == {"4->2": 264} and resize["retained_overall"] < 1.0
    bake = _post(client, "bake", {"checkpoint": "base.safetensors", "loras": {"a.safetensors": 0.8}})
    assert bake["checkpoint"]["family"] == "sd1" and bake["loras"][0]["ranks"] == "4 (x264)"
    extract = _post(client, "extract", {"tuned": "base.safetensors", "base": "base.safetensors", "dim": 8})
    assert extract["targets"]["unet attention"] > 0
    merge_ckpt = _post(client, "ckpt-merge", {"a": "base.safetensors", "b": "base.safetensors",
                                              "block_alpha": ",".join(["0.25"] * 26)})
    assert len(merge_ckpt["m_by_block"]) == 26 and set(merge_ckpt["m_by_block"].values()) == {0.25}
    prune = _post(client, "prune", {"checkpoint": "base.safetensors", "precision": "fp16"})
    assert prune["dropped"] == 0 and prune["expected_bytes"] < prune["checkpoint"]["bytes"] * 0.6
    assert sorted(p.name for folder in folders for p in folder.iterdir()) == before
    assert host.refreshes == 0


def test_lora_jobs_write_into_the_lora_folder_and_refresh_its_list(host, folders):
    loras, _ = folders
    client = _client(host)
    merged = _post(client, "merge", {"loras": {"a.safetensors": 0.7, "b.safetensors": {"ratio": -0.4,
                                                                                        "weights": "OUTD"}},
                                     "out": "merged.safetensors"})
    assert merged["written"] == str(loras / "merged.safetensors") and merged["mode"] == "exact"
    assert merged["retained_overall"] == pytest.approx(1.0) and merged["sources"][1]["block_weights"]
    report = inspect_lora(loras / "merged.safetensors")
    assert report.keys_ok and sorted(set(report.ranks.values())) == [4, 6]  # IN blocks: b weighted 0 by OUTD
    lbw = _post(client, "lbw", {"file": "a.safetensors", "weights": "OUTD", "out": "sub/a_outd.safetensors"})
    weighted = load_file(lbw["written"])
    original = load_file(loras / "a.safetensors")
    assert not any(k.startswith("lora_unet_down_blocks") for k in weighted)
    up = "lora_unet_up_blocks_1_attentions_0_proj_in.lora_up.weight"
    assert torch.equal(weighted[up], original[up])
    resized = _post(client, "resize", {"file": "a.safetensors", "dynamic": "sv_fro:0.9", "rank": 4,
                                       "out": "a_small.safetensors"})
    assert (loras / "a_small.safetensors").is_file() and resized["retained_overall"] >= 0.9 - 1e-6
    assert _post(client, "inspect", {"file": "a_small.safetensors"})["keys_ok"] is True
    assert host.refreshes == 3


def test_checkpoint_jobs_write_into_the_checkpoint_folder(host, folders):
    loras, checkpoints = folders
    client = _client(host)
    bake = _post(client, "bake", {"checkpoint": "base.safetensors", "loras": {"a.safetensors": 0.8},
                                  "out": "baked.safetensors"})
    assert bake["written"] == str(checkpoints / "baked.safetensors") and bake["weights_changed"] > 0
    extract = _post(client, "extract", {"tuned": "baked.safetensors", "base": "base.safetensors", "dim": 4,
                                        "precision": "fp32", "out": "extracted.safetensors"})
    assert extract["written"] == str(loras / "extracted.safetensors") and extract["modules"] > 0
    assert 0 < extract["retained_min"] <= 1 and set(extract["retained_by_block"]) >= {"BASE", "M00"}
    merged = _post(client, "ckpt-merge", {"a": "base.safetensors", "b": "baked.safetensors", "alpha": 1.0,
                                          "out": "merged.safetensors"})
    assert merged["merged"] > 0
    assert torch.equal(load_file(checkpoints / "merged.safetensors")["model.diffusion_model.out.2.weight"],
                       load_file(checkpoints / "baked.safetensors")["model.diffusion_model.out.2.weight"])
    pruned = _post(client, "prune", {"checkpoint": "baked.safetensors", "precision": "fp16",
                                     "out": "pruned.safetensors"})
    assert pruned["bytes_out"] < (checkpoints / "baked.safetensors").stat().st_size * 0.6
    assert host.refreshes == 1  # the extracted LoRA


@pytest.mark.parametrize(("tool", "body", "field"), [
    ("lbw", {"weights": "OUTD"}, "file: missing"),
    ("lbw", {"file": "a.safetensors", "weights": "OUTD", "rank": 2}, "unknown field 'rank'"),
    ("lbw", {"file": "a.safetensors", "weights": "1,0,1"}, "block weights"),
    ("merge", {"loras": {}}, "loras: empty"),
    ("merge", {"loras": ["a.safetensors"]}, "loras: expected a JSON object"),
    ("merge", {"loras": {"a.safetensors": "0.5"}}, "loras['a.safetensors']: expected a number"),
    ("merge", {"loras": {"a.safetensors": {"ratio": 1, "scale": 2}}}, "unknown field 'scale'"),
    ("merge", {"loras": {"a.safetensors": 1}, "rank": "4"}, "rank: expected a whole number"),
    ("merge", {"loras": {"a.safetensors": 1}, "rank": 0}, "rank: 0 is out of range"),
    ("merge", {"loras": {"a.safetensors": 1}, "precision": "fp8"}, "precision: 'fp8' is unknown"),
    ("merge", {"loras": {"a.safetensors": 1}, "out": "../x.safetensors"}, "may not contain '..'"),
    ("merge", {"loras": {"a.safetensors": 1}, "out": "a.safetensors"}, "the output is one of the inputs"),
    ("merge", {"loras": {"a.safetensors": 1}, "out": "b.safetensors"}, "the file exists"),
    ("merge", {"loras": {"a.safetensors": 1}, "out": "x.ckpt"}, ".safetensors"),
    ("merge", {"loras": {"a.safetensors": 1}, "overwrite": "true"}, "overwrite: expected true or false"),
    ("resize", {"file": "missing.safetensors", "rank": 2}, "missing.safetensors"),
    ("resize", {"file": "a.safetensors"}, "give a rank or a dynamic method"),
    ("bake", {"checkpoint": "base.safetensors", "loras": {"a.safetensors": 1}, "precision": "float"},
     "precision: 'float' is unknown"),
    ("extract", {"tuned": "base.safetensors", "base": "base.safetensors", "clamp_quantile": 2},
     "clamp_quantile: 2 is out of range"),
    ("ckpt-merge", {"a": "base.safetensors", "b": "base.safetensors", "block_alpha": "1,x"}, "block_alpha"),
    ("ckpt-merge", {"a": "base.safetensors", "b": "base.safetensors", "block_alpha": "1,1"}, "26"),
    ("ckpt-merge", {"a": "base.safetensors", "b": "base.safetensors", "mode": "add-diff"}, "c: add difference"),
    ("prune", {"checkpoint": "a.safetensors"}, "a.safetensors"),
    ("inspect", [], "not a JSON object"),
])
def test_bad_bodies_are_4xx_naming_the_field(host, folders, tool, body, field):
    before = sorted(p.name for folder in folders for p in folder.rglob("*"))
    answer = _post(_client(host), tool, body, status=400)
    assert field in answer["detail"], answer
    assert sorted(p.name for folder in folders for p in folder.rglob("*")) == before


def test_malformed_json_is_a_400(host):
    response = _client(host).post(f"{PREFIX}/inspect", content=b"{file:", headers={"content-type":
                                                                                    "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["detail"]


def test_exposed_webui_checks_every_input_and_output_path(host, folders, tmp_path):
    loras, checkpoints = folders
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(loras / "a.safetensors", outside / "secret.safetensors")
    client = _client(host, FolderPolicy.build(True, [loras, checkpoints]))
    cases = [("inspect", {"file": str(outside / "secret.safetensors")}, "file"),
             ("lbw", {"file": "../outside/secret.safetensors", "weights": "ALL"}, "file"),
             ("merge", {"loras": {"a.safetensors": 1, str(outside / "secret.safetensors"): 1}}, "loras (entry 2)"),
             ("merge", {"loras": {"a.safetensors": 1}, "out": str(outside / "m.safetensors")}, "out"),
             ("bake", {"checkpoint": str(outside / "c.safetensors"), "loras": {"a.safetensors": 1}}, "checkpoint"),
             ("ckpt-merge", {"a": "base.safetensors", "b": "/etc/passwd"}, "b")]
    for tool, body, field in cases:
        answer = _post(client, tool, body, status=403)
        assert answer["detail"].startswith(f"{field}: this path is outside"), answer
        assert "outside/" not in answer["detail"] and "/etc" not in answer["detail"]
    assert not (outside / "m.safetensors").exists()
    assert _post(client, "inspect", {"file": "a.safetensors"})["keys_ok"] is True


class CancelAfter(threading.Event):
    """Cancel pressed after the job has reported `steps` steps (mid-write, at a known point)."""

    def __init__(self, steps: int):
        super().__init__()
        self.steps = steps

    def is_set(self) -> bool:
        self.steps -= 1
        return self.steps < 0


def test_cancel_stops_a_long_job_mid_write_without_a_file(host, folders):
    progress = ToolProgress(cancel=CancelAfter(50))
    with pytest.raises(ToolCancelled, match="cancelled; no file was written"):
        Tools(host).bake("base.safetensors", [("a.safetensors", 1.0, None)], out="baked.safetensors",
                         progress=progress)
    assert 0 < progress.done < progress.total
    assert sorted(p.name for p in folders[1].iterdir()) == ["base.safetensors"]  # no partial or temporary file


def test_the_panel_jobs_follow_the_folder_rule_too(host, folders, tmp_path):
    """The Tools panel calls `Tools` directly (no route): the rule it is given is checked on every resolved path."""
    from lora_trainer.host.folder_policy import PathNotAllowedError

    loras, checkpoints = folders
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(loras / "a.safetensors", outside / "secret.safetensors")
    tools = Tools(host, lambda: FolderPolicy.build(True, [loras, checkpoints]))
    calls = [(lambda: tools.inspect(str(outside / "secret.safetensors")), "file"),
             (lambda: tools.lbw("a.safetensors", "ALL", out=str(outside / "w.safetensors")), "out"),
             (lambda: tools.merge([("a.safetensors", 1.0, None), ("../outside/secret.safetensors", 1.0, None)]),
              "file"),
             (lambda: tools.extract("base.safetensors", str(outside / "t.safetensors"), dim=4), "base"),
             (lambda: tools.prune("/etc/passwd"), "checkpoint")]
    for call, field in calls:
        with pytest.raises(PathNotAllowedError) as refused:
            call()
        assert str(refused.value).startswith(f"{field}: this path is outside"), refused.value
        assert "outside/" not in str(refused.value) and "/etc" not in str(refused.value)
    assert not (outside / "w.safetensors").exists()
    assert tools.inspect("a.safetensors").to_dict()["keys_ok"] is True
