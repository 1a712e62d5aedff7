"""Metadata of a produced checkpoint: the main input's metadata kept, plus a JSON recipe of what was done.

The keys follow the WebUI's Checkpoint Merger: `sd_merge_recipe` (this job as JSON) and `sd_merge_models` (JSON
`{sha256: {"name", "legacy_hash", "sd_merge_recipe"}}` of the inputs, so a chain of merges can be traced).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from lora_trainer.models.checkpoint import checkpoint_hash

logger = logging.getLogger(__name__)

RECIPE_KEY = "sd_merge_recipe"
MODELS_KEY = "sd_merge_models"


def recipe_metadata(base: dict[str, str], recipe: dict, inputs: list[tuple[Path, dict[str, str]]],
                    hash_inputs: bool = True) -> dict[str, str]:
    """The metadata to write: `base` with the recipe and the input models added.

    Args:
        base (dict[str, str]): the main input's metadata (kept as is, except the two recipe keys).
        recipe (dict): JSON-serialisable description of the job (its `type`, inputs, ratios, precision).
        inputs (list[tuple[Path, dict[str, str]]]): every input file with its own metadata.
        hash_inputs (bool, optional): key `sd_merge_models` by each input's sha256 (reads each file once more);
            else by file name. Defaults to True.

    Returns:
        dict[str, str]: the new metadata.
    """
    metadata = dict(base)
    metadata[RECIPE_KEY] = json.dumps(recipe)
    models = {}
    for path, meta in inputs:
        entry = {"name": path.name}
        if hash_inputs:
            digest = checkpoint_hash(path)
            entry["legacy_hash"] = digest.legacy
            key = digest.sha256
        else:
            key = path.name
        if meta.get(RECIPE_KEY):
            entry[RECIPE_KEY] = meta[RECIPE_KEY]
        models[key] = entry
        if meta.get(MODELS_KEY):  # the inputs' own history, as the WebUI keeps it
            try:
                models.update(json.loads(meta[MODELS_KEY]))
            except json.JSONDecodeError:
                logger.warning("%s: %s metadata is not JSON; its merge history is not carried over", path,
                               MODELS_KEY)
    metadata[MODELS_KEY] = json.dumps(models)
    return metadata


__all__ = ["MODELS_KEY", "RECIPE_KEY", "recipe_metadata"]
