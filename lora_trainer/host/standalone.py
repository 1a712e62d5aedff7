"""The host without a WebUI: loads the checkpoint named by the config itself (cached between runs), has no job
system of its own and nothing to refresh."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from lora_trainer.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class StandaloneJobHandle:
    """A job handle with no host display: progress is only remembered, Interrupt never happens.

    Attributes:
        title (str): the job's title.
        total_steps (int): steps announced at start.
        step (int): the last step reported.
        lend (callable, optional): `() -> context manager` letting go of the host's model lock, defaults to None.
    """

    title: str
    total_steps: int
    step: int = 0
    lend: Callable | None = None

    def progress(self, step: int, total_steps: int) -> None:
        """Remember the progress (the standalone UI polls the job's own status)."""
        self.step, self.total_steps = step, total_steps

    @property
    def interrupted(self) -> bool:
        """Always False: the standalone UI stops jobs through the job itself."""
        return False

    @contextmanager
    def paused(self):
        """While a run is paused: the model lock is free, so a test grid can render on the model.

        Yields:
            StandaloneJobHandle: self (`interrupted` stays False).
        """
        with self.lend() if self.lend is not None else nullcontext():
            yield self


class StandaloneHost:
    """Runs training outside the WebUI.

    Args:
        lora_dir (str | Path): where LoRAs go when the config sets no `output_dir`.
        device (str, optional): "cuda", "cpu", ...; defaults to CUDA when available, else CPU.
        models_dir (str | Path, optional): a folder of checkpoints (the WebUI's `models/Stable-diffusion` layout)
            the Train panel offers in its checkpoint dropdown and the Tools panel reads and writes, defaults to None
            (a path is typed).
    """

    name = "standalone"
    loads_checkpoint = True  # the model comes from the config's checkpoint (and vae) files

    def __init__(self, lora_dir: str | Path, device: str | None = None, models_dir: str | Path | None = None):
        self._lora_dir = Path(lora_dir)
        self.models_dir = Path(models_dir) if models_dir is not None else None
        self._device = device
        self._lock = threading.Lock()
        self._holder: int | None = None  # the thread whose run holds the model (prepare_model)
        self._cached_key: tuple | None = None
        self._cached = None

    @property
    def requested_device(self) -> str | None:
        """The device asked for at construction (None: CUDA when available), checked before a run."""
        return self._device

    @property
    def device(self) -> str:
        """The device models are loaded on."""
        if self._device is None:
            import torch

            self._device = "cuda" if torch.cuda.is_available() else "cpu"
        return self._device

    def _dtype(self, config):
        import torch

        if self.device == "cpu":
            return torch.float32
        if config.model.full_bf16 or (config.model.mixed_precision == "bf16" and not config.model.sdxl):
            return torch.bfloat16
        if config.model.full_fp16:
            return torch.float16
        return torch.float32

    def _key(self, config) -> tuple:
        m = config.model
        path = m.pretrained_model_name_or_path
        if not path:
            raise ConfigError("pretrained_model_name_or_path: not set. Set it to a checkpoint file "
                              "(.safetensors or .ckpt) to train on.")
        path = Path(path).expanduser().resolve()
        stat = path.stat() if path.is_file() else None
        stamp = (stat.st_mtime_ns, stat.st_size) if stat else None
        vae = str(Path(m.vae).expanduser().resolve()) if m.vae else None
        vae_stat = Path(vae).stat() if vae and Path(vae).is_file() else None
        vae_stamp = (vae_stat.st_mtime_ns, vae_stat.st_size) if vae_stat else None
        yaml = path.with_suffix(".yaml")  # the checkpoint's model config (sizes, v-prediction), as in the WebUI
        yaml_stamp = (yaml.stat().st_mtime_ns, yaml.stat().st_size) if yaml.is_file() else None
        return (str(path), stamp, bool(m.v_parameterization), m.diffusers_config_dir, m.tokenizer_dir,
                str(self._dtype(config)), vae, vae_stamp, yaml_stamp)

    def load(self, config):
        """The adapter for `config`'s checkpoint, loaded once and reused while the file and options are the same.

        Args:
            config (TrainConfig): the run's config.

        Returns:
            DiffusersAdapter: the model.

        Raises:
            ConfigError: no checkpoint set. ModelLoadError: the file is missing or cannot be read.
        """
        from lora_trainer.models.loading import load_checkpoint_adapter

        key = self._key(config)
        if self._cached is not None and self._cached_key == key:
            return self._cached
        self._cached, self._cached_key = None, None  # free the old model before loading the new one
        m = config.model
        logger.info("loading %s on %s", key[0], self.device)
        adapter = load_checkpoint_adapter(key[0], v_parameterization=bool(m.v_parameterization),
                                          config_dir=m.diffusers_config_dir, tokenizer_dir=m.tokenizer_dir,
                                          device=self.device, dtype=self._dtype(config), vae=key[6])
        self._cached, self._cached_key = adapter, key
        return adapter

    @contextmanager
    def prepare_model(self, config):
        """Hand out the (cached) model for one run; one run at a time.

        Args:
            config (TrainConfig): the run's config (checkpoint, v_parameterization, config and tokenizer folders).

        Returns:
            A context manager yielding the DiffusersAdapter.
        """
        with self._lock:
            self._holder = threading.get_ident()
            try:
                yield self.load(config)
            finally:
                self._holder = None

    @contextmanager
    def _lend(self):
        """Let go of the model lock this thread's run holds (a paused run), so a grid can render; take it back on
        exit, after the grid in progress is done."""
        if self._holder != threading.get_ident():
            yield
            return
        self._holder = None
        self._lock.release()
        try:
            yield
        finally:
            self._lock.acquire()
            self._holder = threading.get_ident()

    @contextmanager
    def grid_session(self, config):
        """The run's (cached) model and the standalone sampler as a grid renderer; one user of the model at a time.

        Args:
            config (TrainConfig): the run whose LoRA is tested (its checkpoint is loaded, or reused).

        Returns:
            A context manager yielding `(adapter, render)`.
        """
        from lora_trainer.grids import adapter_renderer

        with self._lock:
            adapter = self.load(config)
            yield adapter, adapter_renderer(adapter, config.model.max_token_length)

    def sampler_names(self) -> list[str]:
        """The named samplers of `models.sampling` (diffusers schedulers)."""
        from lora_trainer.models.sampling import SAMPLERS

        return [spec.name for spec in SAMPLERS]

    def check_sampler(self, name: str) -> None:
        """Raise ConfigError for an unknown sampler name (listing the known ones)."""
        from lora_trainer.models.sampling import resolve_sampler

        resolve_sampler(name)

    @contextmanager
    def job(self, title: str, total_steps: int):
        """A no-op job context.

        Args:
            title (str): shown in logs.
            total_steps (int): steps announced.

        Returns:
            A context manager yielding a `StandaloneJobHandle`.
        """
        logger.info("%s: %d steps", title, total_steps)
        yield StandaloneJobHandle(title, total_steps, lend=self._lend)

    def lora_dir(self) -> Path:
        """Where LoRAs go by default."""
        return self._lora_dir

    def checkpoint_dir(self) -> Path | None:
        """The folder of checkpoints given at construction (`models_dir`; None: none given)."""
        return self.models_dir

    def refresh_loras(self) -> None:
        """Nothing to refresh outside the WebUI."""


__all__ = ["StandaloneHost", "StandaloneJobHandle"]
