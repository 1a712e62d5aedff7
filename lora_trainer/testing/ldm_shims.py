"""Make Stability's `ldm` package (stablediffusion repo / stable-diffusion-sdkit) importable without its extras.

`ldm.models.diffusion.ddpm` imports `pytorch_lightning.utilities.distributed.rank_zero_only` (removed in
PyTorch Lightning 2.0) and `torchvision.utils.make_grid` (used only for image logging);
`ldm.modules.encoders.modules` imports `open_clip` at module level, which needs torchvision.
`install_ldm_shims()` adds a real `pytorch_lightning.utilities.distributed` module, then imports the ldm modules
with stand-ins for torchvision / open_clip *only while importing*, when the real ones are missing, and takes the
stand-ins out of `sys.modules` again so that nothing else in the process sees them.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import types
from contextlib import contextmanager

logger = logging.getLogger(__name__)

LDM_MODULES = (
    "ldm.util",
    "ldm.modules.diffusionmodules.openaimodel",
    "ldm.models.autoencoder",
    "ldm.modules.encoders.modules",
    "ldm.models.diffusion.ddpm",
)


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _make_grid(tensor, nrow: int = 8, padding: int = 2, **_kwargs):
    """A small `torchvision.utils.make_grid` for `[B,C,H,W]` tensors (ldm's image logging only)."""
    import torch

    batch, channels, height, width = tensor.shape
    cols = min(nrow, batch)
    rows = (batch + cols - 1) // cols
    grid = tensor.new_zeros(channels, rows * (height + padding) + padding, cols * (width + padding) + padding)
    for i in range(batch):
        top = padding + (i // cols) * (height + padding)
        left = padding + (i % cols) * (width + padding)
        grid[:, top:top + height, left:left + width] = tensor[i]
    return torch.as_tensor(grid)


def _missing(name: str):
    def fail(*_args, **_kwargs):
        raise ImportError(f"{name} is not installed: this ldm code path needs it. Install {name.split('.')[0]}.")

    return fail


def _stand_ins() -> dict[str, types.ModuleType]:
    modules: dict[str, types.ModuleType] = {}
    if not _importable("torchvision"):
        torchvision = types.ModuleType("torchvision")
        utils = types.ModuleType("torchvision.utils")
        utils.make_grid = _make_grid
        torchvision.utils = utils
        modules.update({"torchvision": torchvision, "torchvision.utils": utils})
    if not _importable("open_clip"):
        sys.modules.pop("open_clip", None)
        open_clip = types.ModuleType("open_clip")
        open_clip.create_model_and_transforms = _missing("open_clip.create_model_and_transforms")
        open_clip.tokenize = _missing("open_clip.tokenize")
        modules["open_clip"] = open_clip
    return modules


@contextmanager
def _temporarily(modules: dict[str, types.ModuleType]):
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


def _install_lightning_distributed() -> None:
    name = "pytorch_lightning.utilities.distributed"
    if name in sys.modules or _importable(name):
        return
    from pytorch_lightning.utilities import rank_zero_only

    module = types.ModuleType(name)
    module.rank_zero_only = rank_zero_only
    sys.modules[name] = module


def install_ldm_shims() -> bool:
    """Make `from ldm.models.diffusion.ddpm import LatentDiffusion` work here.

    Returns:
        bool: True when the ldm modules are imported; False when `ldm` (or pytorch_lightning) is not installed.
    """
    if all(name in sys.modules for name in LDM_MODULES):
        return True
    if importlib.util.find_spec("ldm") is None or importlib.util.find_spec("pytorch_lightning") is None:
        logger.info("ldm or pytorch_lightning is not installed; ldm models are unavailable")
        return False
    _install_lightning_distributed()
    with _temporarily(_stand_ins()):
        for name in LDM_MODULES:
            importlib.import_module(name)
    return True


def build_ldm_model(yaml_path, checkpoint_path, cond_stage=None):
    """Instantiate an ldm `LatentDiffusion` from its yaml and load an original single-file checkpoint strictly.

    The noise-schedule buffers may be absent from the file (ldm computes them from the yaml). With transformers
    >= 5.6 `CLIPTextModel` has no `.text_model` level, so `cond_stage_model.transformer.text_model.` keys are
    mapped onto it.

    Args:
        yaml_path (str | Path): the ldm config (`model.target` = LatentDiffusion).
        checkpoint_path (str | Path): `.safetensors` (or a torch file readable with weights_only=True).
        cond_stage (nn.Module, optional): used as `cond_stage_model` instead of the yaml's (e.g. an OpenCLIP text
            tower where `open_clip` cannot be imported); the checkpoint's `cond_stage_model.` weights are loaded
            into it, defaults to None.

    Returns:
        nn.Module: the model in eval mode.

    Raises:
        RuntimeError: when ldm is not importable, or keys other than the schedule buffers are missing/unexpected.
    """
    import torch
    from omegaconf import OmegaConf

    if not install_ldm_shims():
        raise RuntimeError("ldm is not importable: install stable-diffusion-sdkit (Stability's ldm package).")
    from ldm.util import instantiate_from_config

    config = OmegaConf.load(str(yaml_path)).model
    if cond_stage is not None:
        config.params.cond_stage_config = {"target": "torch.nn.Identity"}
    model = instantiate_from_config(config)
    if cond_stage is not None:
        model.cond_stage_model = cond_stage
    if str(checkpoint_path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(checkpoint_path))
    else:
        state = torch.load(str(checkpoint_path), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    own = model.state_dict()
    prefix = "cond_stage_model.transformer."
    fixed = {}
    for key, value in state.items():
        if key.startswith(prefix + "text_model.") and key not in own:
            key = prefix + key[len(prefix + "text_model."):]
        fixed[key] = value
    result = model.load_state_dict(fixed, strict=False)
    buffers = {name for name, _ in model.named_buffers()}
    missing = [k for k in result.missing_keys if k not in buffers]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"{checkpoint_path}: does not fit {yaml_path}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return model.eval()
