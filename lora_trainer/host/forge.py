"""The Forge host: lllyasviel's Stable Diffusion WebUI Forge (its own `backend` package). The only module besides
`forge_*.py` that imports Forge's `backend` and `modules_forge`.

Forge keeps A1111's `modules` (shared options and state, the Lora folder, the call queue), so `ForgeHost` reuses
`A1111Host` for everything but the model: prepare_model works on `sd_model.forge_objects`.
"""
from __future__ import annotations

import contextlib
import logging

from lora_trainer.errors import ModelLoadError
from lora_trainer.host.a1111 import A1111Host

logger = logging.getLogger(__name__)


class ForgeHost(A1111Host):
    """The Host (see `host/base.py`) for Stable Diffusion WebUI Forge."""

    name = "forge"

    @contextlib.contextmanager
    def prepare_model(self, config):
        raise ModelLoadError("Forge: training on Forge's loaded model is not available in this version. "
                             "Train with `python -m lora_trainer train` on the checkpoint file.")
        yield  # pragma: no cover
