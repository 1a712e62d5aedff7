"""Host detection by capability: fake WebUI package trees on sys.path, the real `detect_host` on them."""
from __future__ import annotations

import importlib
import sys

import pytest

from lora_trainer.errors import ModelLoadError
from lora_trainer.host.detect import HOSTS, HostKind, detect_host, detect_host_kind, has_module

HOST_PACKAGES = ("modules", "modules_forge", "backend", "ldm_patched")

TREES = {
    "a1111": ["modules/__init__.py", "modules/sd_models.py"],
    "forge": ["modules/__init__.py", "modules/sd_models.py", "modules_forge/__init__.py", "backend/__init__.py",
              "backend/diffusion_engine/__init__.py"],
    "reforge": ["modules/__init__.py", "modules/sd_models.py", "modules_forge/__init__.py",
                "ldm_patched/__init__.py"],
    "forge_without_engines": ["modules/__init__.py", "modules/sd_models.py", "modules_forge/__init__.py",
                              "backend/__init__.py"],
    "none": [],
}


@pytest.fixture()
def fake_host(tmp_path, monkeypatch):
    """Make a fake WebUI's packages importable (and only them) for one test."""
    def make(tree: str):
        for name in list(sys.modules):
            if name.split(".")[0] in HOST_PACKAGES:
                monkeypatch.delitem(sys.modules, name)
        root = tmp_path / tree
        for rel in TREES[tree]:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text("")
        root.mkdir(exist_ok=True)
        monkeypatch.syspath_prepend(str(root))
        importlib.invalidate_caches()
        return root

    yield make
    for name in list(sys.modules):
        if name.split(".")[0] in HOST_PACKAGES:
            sys.modules.pop(name, None)


@pytest.mark.parametrize("tree, expected", [("a1111", "a1111"), ("forge", "forge"), ("reforge", "reforge")])
def test_each_known_tree_is_detected_as_its_host(fake_host, tree, expected):
    fake_host(tree)
    assert detect_host_kind().name == expected


@pytest.mark.parametrize("tree, class_name", [("forge", "ForgeHost"), ("reforge", "ReForgeHost"),
                                              ("a1111", "A1111Host")])
def test_detect_host_builds_the_matching_host_class(fake_host, tree, class_name):
    fake_host(tree)
    host = detect_host(lora_dir="loras")
    assert type(host).__name__ == class_name and host.name == tree


@pytest.mark.parametrize("tree, named", [
    ("forge_without_engines", ["forge: no 'backend.diffusion_engine'", "reforge: no 'ldm_patched'"]),
    ("none", ["forge: no 'modules'", "a1111: no 'modules'"]),
])
def test_an_unknown_host_is_refused_naming_what_is_missing(fake_host, tree, named):
    fake_host(tree)
    with pytest.raises(ModelLoadError) as info:
        detect_host()
    for part in named:
        assert part in str(info.value)
    assert "python -m lora_trainer train" in str(info.value)


def test_a_new_host_is_one_table_line(fake_host):
    fake_host("reforge")
    extra = HostKind("reforge", ("modules_forge", "ldm_patched"), ("backend.diffusion_engine",),
                     "lora_trainer.host.a1111:A1111Host")
    without = tuple(kind for kind in HOSTS if kind.name != "reforge")
    assert detect_host_kind(without + (extra,)) is extra


def test_has_module_is_false_below_a_missing_package():
    assert not has_module("no_such_package_xyz.sub")
    assert has_module("json")
