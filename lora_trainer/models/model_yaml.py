"""The WebUI's convention for a checkpoint's model config: a same-named `.yaml` beside it (ldm's
`v2-inference-v.yaml` layout for SD1/SD2, sgm's `sd_xl_base.yaml` for SDXL).

What is read: v-prediction (`parameterization: "v"`, or sgm's `VScaling`), the UNet sizes
(`model.params.unet_config.params` / `network_config.params`: in_channels, model_channels, context_dim, and the
head rule `num_heads` / `num_head_channels`, which the weights cannot tell), the VAE `scale_factor`, and the text
encoders' head counts where the yaml names a local model (a transformers folder as FrozenCLIPEmbedder's `version`,
an OpenCLIP `arch` whose `<arch>.json` lies beside the yaml).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from lora_trainer.errors import ModelLoadError

logger = logging.getLogger(__name__)

OPEN_CLIP_HEAD_WIDTH = 64  # open_clip's default text `head_width`


@dataclass(frozen=True)
class ModelYaml:
    """What a checkpoint's `.yaml` says.

    Attributes:
        path (Path): the yaml file.
        v_parameterization (bool): the model predicts v.
        unet (dict): the UNet's params (ldm `unet_config.params` or sgm `network_config.params`).
        scale_factor (float, optional): the latent scale factor (the VAE's `scaling_factor`).
        text_heads (tuple): attention heads per text encoder (None where the yaml names no local model).
    """

    path: Path
    v_parameterization: bool
    unet: dict = field(default_factory=dict)
    scale_factor: float | None = None
    text_heads: tuple[int | None, ...] = ()

    def unet_int(self, key: str) -> int | None:
        """An integer UNet param, None when absent."""
        value = self.unet.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelLoadError(f"{self.path}: {key} = {value!r} is not a whole number. Fix the yaml, or remove it "
                                 "to use the sizes in the checkpoint.")
        return value


def yaml_path_for(checkpoint: str | Path) -> Path:
    """Where the WebUI looks for a checkpoint's config: the same name with `.yaml`.

    Args:
        checkpoint (str | Path): the checkpoint file.

    Returns:
        Path: `<folder>/<stem>.yaml` (it may not exist).
    """
    return Path(checkpoint).with_suffix(".yaml")


def _section(data, keys: tuple[str, ...], path: Path, required: bool = True) -> dict:
    for depth, key in enumerate(keys):
        data = data.get(key) if isinstance(data, dict) else None
        if data is None and not required:
            return {}
        if not isinstance(data, dict):
            where = ".".join(keys[:depth + 1])
            raise ModelLoadError(f"{path}: no {where} section (an ldm/sgm model config has model.params with "
                                 "unet_config or network_config). Fix the yaml, or remove it to use the sizes in "
                                 "the checkpoint.")
    return data


def _v_prediction(params: dict) -> bool:
    if params.get("parameterization") == "v":
        return True
    scaling = _section(params, ("denoiser_config", "params", "scaling_config"), Path(), required=False)
    return str(scaling.get("target", "")).endswith("VScaling")


def _clip_heads(version, folder: Path) -> int | None:
    """Heads of a FrozenCLIPEmbedder whose `version` is a local transformers folder."""
    if not isinstance(version, str):
        return None
    for candidate in (Path(version).expanduser(), folder / version):
        config = candidate / "config.json"
        if config.is_file():
            data = json.loads(config.read_text(encoding="utf-8"))
            return data.get("text_config", data).get("num_attention_heads")
    return None


def _open_clip_heads(arch, folder: Path) -> int | None:
    """Heads of an OpenCLIP text tower whose `arch` config lies beside the yaml (`<arch>.json`)."""
    config = folder / f"{arch}.json" if isinstance(arch, str) else None
    if config is None or not config.is_file():
        return None
    text = json.loads(config.read_text(encoding="utf-8")).get("text_cfg", {})
    return text.get("heads") or text.get("width", 0) // text.get("head_width", OPEN_CLIP_HEAD_WIDTH) or None


def _text_heads(params: dict, folder: Path) -> tuple[int | None, ...]:
    embedders = _section(params, ("conditioner_config", "params"), folder, required=False).get("emb_models")
    if not isinstance(embedders, list):
        embedders = [params.get("cond_stage_config")]
    heads = []
    for embedder in embedders:
        if not isinstance(embedder, dict):
            continue
        target = str(embedder.get("target", ""))
        args = embedder.get("params") or {}
        if target.endswith("FrozenCLIPEmbedder"):
            heads.append(_clip_heads(args.get("version"), folder))
        elif "FrozenOpenCLIPEmbedder" in target:
            heads.append(_open_clip_heads(args.get("arch"), folder))
    return tuple(heads)


def read_model_yaml(checkpoint: str | Path) -> ModelYaml | None:
    """Read the `.yaml` beside a checkpoint, as the WebUI does.

    Args:
        checkpoint (str | Path): the checkpoint file.

    Returns:
        ModelYaml | None: what it says; None when there is no yaml.

    Raises:
        ModelLoadError: the yaml is not valid YAML or not an ldm/sgm model config (the message names it).
    """
    import yaml

    path = yaml_path_for(checkpoint)
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{path}: not valid YAML ({first}). Fix the yaml, or remove it to use the sizes in "
                             "the checkpoint.") from exc
    params = _section(data, ("model", "params"), path)
    unet_key = "network_config" if "network_config" in params else "unet_config"
    unet = _section(params, (unet_key, "params"), path)
    scale = params.get("scale_factor")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ModelLoadError(f"{path}: scale_factor = {scale!r} is not a number. Fix the yaml, or remove it.")
    found = ModelYaml(path=path, v_parameterization=_v_prediction(params), unet=dict(unet),
                      scale_factor=float(scale) if scale is not None else None,
                      text_heads=_text_heads(params, path.parent))
    for key in ("in_channels", "model_channels", "num_heads", "num_head_channels"):
        found.unet_int(key)  # type errors are reported now, naming the yaml
    logger.info("%s: model config read (%s)", path.name, "v-prediction" if found.v_parameterization else "epsilon")
    return found


__all__ = ["ModelYaml", "read_model_yaml", "yaml_path_for"]
