"""Install what the LoRA Trainer extension needs into the WebUI's Python, without touching what is there.

Run by the WebUI at startup (or by hand: `python install.py [--dry-run]`). Rules:
- a package that is already installed is never upgraded, downgraded or replaced, even when its version is outside
  our range (that is reported instead): the WebUI pins its stack;
- missing packages are installed with every installed distribution pinned as a pip constraint, so their
  dependencies cannot replace WebUI packages either;
- onnxruntime-gpu when the host's torch has CUDA, onnxruntime otherwise, never both (an installed one of either is
  kept);
- bitsandbytes only on platforms it ships wheels for (Linux x86_64/aarch64, Windows x86_64).
The WebUI's `launch.run_pip` is used when present. Prints what it did.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

try:
    from packaging.requirements import Requirement
except ImportError:  # pip always carries a copy
    from pip._vendor.packaging.requirements import Requirement

REQUIREMENTS = [
    "safetensors>=0.4",
    "diffusers>=0.27",
    "accelerate>=0.21",
    "tomli_w>=1.0",
    "prodigyopt>=1.0",
    "dadaptation>=3.1",
    "lion-pytorch>=0.1.2",
]
ONNX_PACKAGES = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-silicon",
                 "onnxruntime-openvino")
BITSANDBYTES = "bitsandbytes>=0.43"
BNB_PLATFORMS = {("linux", "x86_64"), ("linux", "aarch64"), ("win32", "amd64"), ("win32", "x86_64")}


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of `-_.` as one `-`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_versions() -> dict[str, str]:
    """{normalized distribution name: version} of this Python's installed packages."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found[normalize(name)] = dist.version
    return found


@dataclass
class Plan:
    """What to do.

    Attributes:
        install (list[str]): requirement strings to install.
        kept (list[str]): installed packages left alone, with a note when outside our range.
        skipped (list[str]): packages not installed, with the reason.
    """

    install: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _check(requirement: str, installed: dict[str, str], plan: Plan) -> None:
    req = Requirement(requirement)
    version = installed.get(normalize(req.name))
    if version is None:
        plan.install.append(requirement)
    elif req.specifier and not req.specifier.contains(version, prereleases=True):
        plan.kept.append(f"{req.name} {version} (kept although {requirement} is asked: never replaced)")
    else:
        plan.kept.append(f"{req.name} {version}")


def make_plan(installed: dict[str, str], cuda: bool, system: str, machine: str,
              requirements: list[str] = REQUIREMENTS) -> Plan:
    """Decide what to install.

    Args:
        installed (dict[str, str]): `installed_versions()`.
        cuda (bool): the host's torch has CUDA.
        system (str): `sys.platform`.
        machine (str): `platform.machine()`.
        requirements (list[str], optional): the plain requirements, defaults to REQUIREMENTS.

    Returns:
        Plan: installs, kept and skipped packages.
    """
    plan = Plan()
    for requirement in requirements:
        _check(requirement, installed, plan)
    have_onnx = [name for name in ONNX_PACKAGES if name in installed]
    if have_onnx:
        plan.kept.append(f"{have_onnx[0]} {installed[have_onnx[0]]}")
    else:
        plan.install.append("onnxruntime-gpu>=1.16" if cuda else "onnxruntime>=1.16")
    if (system, machine.lower()) in BNB_PLATFORMS:
        _check(BITSANDBYTES, installed, plan)
    else:
        plan.skipped.append(f"bitsandbytes: no build for {system}/{machine} (8-bit optimizers unavailable)")
    return plan


def constraints_text(installed: dict[str, str]) -> str:
    """A pip constraints file pinning every installed distribution at its current version."""
    return "".join(f"{name}=={version}\n" for name, version in sorted(installed.items()))


def torch_has_cuda() -> bool:
    """True when the installed torch was built with CUDA (no GPU needed)."""
    try:
        import torch
    except ImportError:
        return False
    return torch.version.cuda is not None


def run_pip(args: list[str], desc: str) -> None:
    """`pip <args>` through the WebUI's `launch.run_pip` when available, else this Python's pip."""
    try:
        from launch import run_pip as webui_run_pip
    except ImportError:
        webui_run_pip = None
    if webui_run_pip is not None:
        webui_run_pip(" ".join(f'"{a}"' if " " in a else a for a in args), desc)
        return
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def main(argv: list[str]) -> int:
    installed = installed_versions()
    plan = make_plan(installed, torch_has_cuda(), sys.platform, platform.machine())
    for line in plan.kept:
        print(f"[lora-trainer] present: {line}")
    for line in plan.skipped:
        print(f"[lora-trainer] skipped: {line}")
    if not plan.install:
        print("[lora-trainer] nothing to install")
        return 0
    print(f"[lora-trainer] installing: {', '.join(plan.install)}")
    if "--dry-run" in argv:
        return 0
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
        handle.write(constraints_text(installed))
    try:
        run_pip(["install", "--prefer-binary", "-c", handle.name, *plan.install], "LoRA Trainer requirements")
    finally:
        os.unlink(handle.name)
    after = installed_versions()
    changed = [f"{n} {v} -> {after.get(n)}" for n, v in installed.items() if after.get(n) != v]
    print(f"[lora-trainer] installed: {', '.join(plan.install)}; WebUI packages changed: {changed or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
