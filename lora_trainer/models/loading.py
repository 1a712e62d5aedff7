"""Load a single-file SD1/SD2/SDXL checkpoint into a DiffusersAdapter, offline, with local diffusers configs."""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

import torch

from lora_trainer.errors import ModelLoadError
from lora_trainer.models.checkpoint import checkpoint_hash
from lora_trainer.models.diffusers_adapter import DiffusersAdapter

logger = logging.getLogger(__name__)

UNET_PREFIXES = ("model.diffusion_model.",)
VAE_PREFIXES = ("first_stage_model.",)
TEXT_PREFIXES = ("cond_stage_model.", "conditioner.")



def file_id(path: str | Path) -> str:
    """A short identity of a checkpoint file: the first 12 hex digits of its sha256 (the WebUI shows 10).

    Args:
        path (str | Path): the file.

    Returns:
        str: the id.
    """
    return checkpoint_hash(path).sha256[:12]


def _tokenizer_subfolders(architecture: str) -> tuple[str, ...]:
    return ("tokenizer", "tokenizer_2") if architecture == "sdxl" else ("tokenizer",)


def _find_tokenizer_folder(sub: str, tokenizer_dir: Path | None, config_dir: Path) -> Path | None:
    if tokenizer_dir is None:
        candidates = [config_dir / sub]
    elif sub == "tokenizer":
        candidates = [tokenizer_dir / sub, tokenizer_dir]
    else:  # SDXL's second tokenizer: inside tokenizer_dir, or beside it when tokenizer_dir is the first one
        candidates = [tokenizer_dir / sub, tokenizer_dir.parent / sub]
    return next((c for c in candidates if (c / "vocab.json").is_file()), None)


def load_tokenizers(architecture: str, config_dir: Path, tokenizer_dir: Path | None = None) -> list:
    """The CLIP tokenizer(s) of an architecture, from local files or generated offline.

    Args:
        architecture (str): "sd1", "sd2", "sd2-v" or "sdxl".
        config_dir (Path): the diffusers config folder (its `tokenizer/`, `tokenizer_2/` are used when present).
        tokenizer_dir (Path, optional): a tokenizer folder (for SDXL with `tokenizer_2/` beside it), or a folder
            holding `tokenizer/` (and `tokenizer_2/`), defaults to None: config_dir's, else built offline from
            OpenCLIP's BPE file with the architecture's pad token.

    Returns:
        list: one `CLIPTokenizer` per text encoder.
    """
    from transformers import CLIPTokenizer

    from lora_trainer.models.configs import TOKENIZERS
    from lora_trainer.models.tokenizer import write_clip_tokenizer

    tokenizers = []
    for sub in _tokenizer_subfolders(architecture):
        folder = _find_tokenizer_folder(sub, tokenizer_dir, config_dir)
        if folder is None and tokenizer_dir is not None:
            raise ModelLoadError(f"{tokenizer_dir}: no CLIP tokenizer ({sub}/vocab.json) found. Pass a folder "
                                 "with vocab.json and merges.txt, or leave tokenizer_dir unset to build one.")
        if folder is None:
            with tempfile.TemporaryDirectory() as tmp:
                built = write_clip_tokenizer(Path(tmp) / sub, pad_token=TOKENIZERS[architecture][sub])
                tokenizers.append(CLIPTokenizer.from_pretrained(str(built)))
            continue
        tokenizers.append(CLIPTokenizer.from_pretrained(str(folder)))
    return tokenizers


def _prediction_type(config_dir: Path, architecture: str, v_parameterization: bool) -> str:
    if v_parameterization or architecture == "sd2-v":
        return "v_prediction"
    scheduler = config_dir / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        return json.loads(scheduler.read_text(encoding="utf-8")).get("prediction_type", "epsilon")
    return "epsilon"


def _scheduler_config(config_dir: Path) -> dict:
    path = config_dir / "scheduler" / "scheduler_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _text_encoders(state_dict: dict, architecture: str, config_dir: Path, dtype: torch.dtype) -> list:
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    classes = [("text_encoder", CLIPTextModel)]
    if architecture == "sdxl":
        classes.append(("text_encoder_2", CLIPTextModelWithProjection))
    return [
        create_diffusers_clip_model_from_ldm(cls, state_dict, subfolder=sub, config=str(config_dir),
                                             torch_dtype=dtype, local_files_only=True)
        for sub, cls in classes
    ]


def _load_components(state_dict, architecture: str, config_dir: Path, dtype: torch.dtype) -> dict:
    """Build each model from its own part of the checkpoint, read just before and dropped just after, so the
    peak is the finished models plus one component (not the whole file on top of them)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from lora_trainer.models.checkpoint import subset

    common = {"config": str(config_dir), "local_files_only": True, "torch_dtype": dtype}
    part = subset(state_dict, UNET_PREFIXES)
    unet = UNet2DConditionModel.from_single_file(part, subfolder="unet", **common)
    part = subset(state_dict, VAE_PREFIXES)
    vae = AutoencoderKL.from_single_file(part, subfolder="vae", **common)
    part = subset(state_dict, TEXT_PREFIXES)
    text_encoders = _text_encoders(part, architecture, config_dir, dtype)
    del part
    return {"unet": unet, "vae": vae, "text_encoders": text_encoders}


def load_vae(path: str | Path, config_dir: Path, dtype: torch.dtype = torch.float32):
    """An external VAE (the `vae` key): a single-file VAE in the original layout (`encoder.down.0...`, with or
    without a `first_stage_model.` prefix, so a full checkpoint works too) or in diffusers' layout.

    Args:
        path (str | Path): `.safetensors` (or a weights-only `.ckpt`/`.pt`) file.
        config_dir (Path): the diffusers config folder whose `vae/config.json` gives the sizes.
        dtype (torch.dtype, optional): weight dtype, defaults to torch.float32.

    Returns:
        AutoencoderKL: the VAE.

    Raises:
        ModelLoadError: unreadable file, or weights that do not fit the model's VAE (named, with the fix).
    """
    from diffusers import AutoencoderKL

    from lora_trainer.models.checkpoint import read_state_dict

    path = Path(path)
    try:
        state_dict = read_state_dict(path)
    except (FileNotFoundError, ModelLoadError) as exc:
        raise ModelLoadError(f"vae: {exc}") from exc
    prefix = VAE_PREFIXES[0]
    if any(key.startswith(prefix) for key in state_dict):
        state_dict = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    try:
        if any(key.startswith("encoder.down_blocks.") for key in state_dict):  # diffusers layout
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(config_dir), subfolder="vae"))
            vae.load_state_dict(state_dict)
            vae.to(dtype)
        else:
            vae = AutoencoderKL.from_single_file(state_dict, config=str(config_dir), subfolder="vae",
                                                 local_files_only=True, torch_dtype=dtype)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"vae: {path} does not fit this model's VAE ({type(exc).__name__}: {str(exc)[:300]}). "
                             "Use a VAE made for this architecture (SD1/SD2 or SDXL), or unset vae.") from exc
    logger.info("vae: loaded %s", path.name)
    return vae


def _config_folder(state_dict, architecture: str, model_yaml, config_dir, derived: Path, path: Path) -> Path:
    """The given diffusers config folder, or configs derived from the checkpoint's shapes (and its yaml)."""
    from lora_trainer.models.checkpoint import tensor_shapes
    from lora_trainer.models.derived_configs import derive_configs, write_config_folder

    if config_dir is not None:
        configs = Path(config_dir)
        if not (configs / "unet" / "config.json").is_file():
            raise ModelLoadError(f"{configs}: not a diffusers config folder (no unet/config.json). Pass "
                                 "diffusers_config_dir pointing at a folder with unet/, vae/, text_encoder/ configs, "
                                 "or leave it empty to take the sizes from the checkpoint.")
        return configs
    configs = derive_configs(tensor_shapes(state_dict), architecture, model_yaml, source=str(path))
    logger.info("%s: sizes taken from its weights%s", path.name,
                f" and {model_yaml.path.name}" if model_yaml is not None else "")
    return write_config_folder(configs, architecture, derived)


def load_checkpoint_adapter(path: str | Path, *, v_parameterization: bool = False, config_dir: str | Path | None = None,
                            tokenizer_dir: str | Path | None = None, device: str | torch.device = "cpu",
                            dtype: torch.dtype = torch.float32, vae: str | Path | None = None) -> DiffusersAdapter:
    """Load an original single-file checkpoint (`.safetensors`, `.ckpt`) as a DiffusersAdapter, offline.

    Args:
        path (str | Path): the checkpoint file.
        v_parameterization (bool, optional): the model predicts v (SD2 768-v), defaults to False; a same-named
            `.yaml` beside the checkpoint saying `parameterization: "v"` sets it too (as in the WebUI).
        config_dir (str | Path, optional): diffusers config folder (`unet/`, `vae/`, `text_encoder/`, ...),
            defaults to configs derived from the checkpoint's tensor shapes and its `.yaml` (see
            `derived_configs`).
        tokenizer_dir (str | Path, optional): tokenizer folder (see load_tokenizers), defaults to None.
        device (str | torch.device, optional): where to put the models, defaults to "cpu".
        dtype (torch.dtype, optional): weight dtype, defaults to torch.float32.
        vae (str | Path, optional): an external VAE file replacing the checkpoint's own (see `load_vae`),
            defaults to None.

    Returns:
        DiffusersAdapter: frozen (requires_grad False), eval-mode models; `model_id` = short file hash (of the
        checkpoint and the external VAE, so cached latents follow the VAE).

    Raises:
        ModelLoadError: the file is missing or unreadable, the architecture is unknown, or the weights do not fit
            the configs.
    """
    from lora_trainer.models.checkpoint import detect_architecture, open_state_dict
    from lora_trainer.models.model_yaml import read_model_yaml

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: checkpoint file not found. Check pretrained_model_name_or_path.")
    state_dict = open_state_dict(path)
    model_yaml = read_model_yaml(path)
    v_parameterization = v_parameterization or (model_yaml is not None and model_yaml.v_parameterization)
    architecture = detect_architecture(state_dict, v_parameterization=v_parameterization, source=path)
    with tempfile.TemporaryDirectory(prefix="lora_trainer_configs_") as derived:
        configs = _config_folder(state_dict, architecture, model_yaml, config_dir, Path(derived), path)
        try:
            parts = _load_components(state_dict, architecture, configs, dtype)
        except (RuntimeError, ValueError, KeyError, OSError) as exc:
            raise ModelLoadError(f"{path}: the weights do not load into the {architecture} configs in {configs} "
                                 f"({type(exc).__name__}: {str(exc)[:500]}). Pass the matching diffusers_config_dir, "
                                 "or check the file is a complete SD1/SD2/SDXL checkpoint.") from exc
        del state_dict
        if vae is not None:
            parts["vae"] = load_vae(vae, configs, dtype)
        tokenizers = load_tokenizers(architecture, configs, Path(tokenizer_dir) if tokenizer_dir is not None else None)
        scheduler_config = _scheduler_config(configs)
        prediction_type = _prediction_type(configs, architecture, v_parameterization)
    for module in [parts["unet"], parts["vae"], *parts["text_encoders"]]:
        module.requires_grad_(False)
        module.eval()
        module.to(device)
    logger.info("loaded %s checkpoint %s (%s)", architecture, path.name, dtype)
    file_hash = checkpoint_hash(path)
    model_id = file_hash.sha256[:12]
    if vae is not None:
        model_id = hashlib.sha256(f"{file_hash.sha256}|{checkpoint_hash(vae).sha256}".encode()).hexdigest()[:12]
    adapter = DiffusersAdapter(
        unet=parts["unet"], vae=parts["vae"], text_encoders=parts["text_encoders"], tokenizers=tokenizers,
        scheduler_config=scheduler_config, architecture=architecture, prediction_type=prediction_type,
        model_id=model_id,
    )
    adapter.checkpoint_sha256 = file_hash.sha256  # kohya's ss_new_sd_model_hash, as the WebUI host sets it
    return adapter
