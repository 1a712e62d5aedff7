"""install.py: installs only what is missing, never replaces a WebUI package, one onnxruntime, bitsandbytes only
where it has a build; and pip with its constraints really refuses to replace a pinned package."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def install():
    spec = importlib.util.spec_from_file_location("lora_trainer_install", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _plan(install, installed, cuda=False, system="linux", machine="x86_64"):
    return install.make_plan(installed, cuda, system, machine)


def test_missing_packages_are_installed_and_present_ones_kept(install):
    plan = _plan(install, {"safetensors": "0.4.2", "diffusers": "0.30.0", "tomli-w": "1.0.0"})
    assert not any(r.startswith(("safetensors", "diffusers", "tomli_w")) for r in plan.install)
    assert "prodigyopt>=1.0" in plan.install and "lion-pytorch>=0.1.2" in plan.install
    assert any(k.startswith("diffusers 0.30.0") for k in plan.kept)


def test_an_installed_version_outside_our_range_is_never_replaced(install):
    plan = _plan(install, {"diffusers": "0.20.0", "safetensors": "0.3.1"})
    assert not any(r.startswith(("diffusers", "safetensors")) for r in plan.install)
    assert any("diffusers 0.20.0" in k and "never replaced" in k for k in plan.kept)


@pytest.mark.parametrize("cuda, expected", [(True, "onnxruntime-gpu>=1.16"), (False, "onnxruntime>=1.16")])
def test_onnxruntime_flavour_follows_torch_cuda(install, cuda, expected):
    plan = _plan(install, {}, cuda=cuda)
    onnx = [r for r in plan.install if r.startswith("onnxruntime")]
    assert onnx == [expected]


@pytest.mark.parametrize("present", ["onnxruntime", "onnxruntime-gpu", "onnxruntime-directml"])
def test_an_installed_onnxruntime_of_any_flavour_means_no_second_one(install, present):
    for cuda in (True, False):
        plan = _plan(install, {present: "1.17.0"}, cuda=cuda)
        assert not any(r.startswith("onnxruntime") for r in plan.install)


@pytest.mark.parametrize("system, machine, wanted", [
    ("linux", "x86_64", True), ("linux", "aarch64", True), ("win32", "AMD64", True),
    ("darwin", "arm64", False), ("linux", "ppc64le", False),
])
def test_bitsandbytes_only_where_it_has_a_build(install, system, machine, wanted):
    plan = _plan(install, {}, system=system, machine=machine)
    assert any(r.startswith("bitsandbytes") for r in plan.install) == wanted
    assert any(s.startswith("bitsandbytes") for s in plan.skipped) != wanted


def test_names_are_normalized_and_constraints_pin_everything(install):
    assert install.normalize("Lion_Pytorch") == install.normalize("lion.pytorch") == "lion-pytorch"
    text = install.constraints_text({"numpy": "1.26.2", "pillow": "9.5.0"})
    assert text == "numpy==1.26.2\npillow==9.5.0\n"
    installed = install.installed_versions()
    assert installed["pytest"] == pytest.__version__


def test_dry_run_prints_the_plan_and_installs_nothing():
    before = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    out = subprocess.run([sys.executable, str(ROOT / "install.py"), "--dry-run"], capture_output=True, text=True,
                         check=True).stdout
    assert "[lora-trainer]" in out and ("nothing to install" in out or "installing:" in out)
    assert subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True).stdout == before


def test_pip_with_the_constraints_refuses_to_replace_a_pinned_package(install, tmp_path):
    """The real pip resolver: a request that needs another version of an installed package is a conflict with
    the constraints (not merely "not found"), and the same version is accepted as already there."""
    installed = install.installed_versions()
    constraints = tmp_path / "c.txt"
    constraints.write_text(install.constraints_text(installed), encoding="utf-8")
    version = installed["pytest"]
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index", "-c", str(constraints)]
    other = subprocess.run([*pip, f"pytest!={version}"], capture_output=True, text=True, check=False)
    assert other.returncode != 0 and "ResolutionImpossible" in other.stdout + other.stderr
    same = subprocess.run([*pip, "pytest"], capture_output=True, text=True, check=False)
    assert same.returncode == 0 and "already satisfied" in same.stdout
    assert install.installed_versions()["pytest"] == version
