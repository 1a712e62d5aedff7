"""Errors the user sees. Each message names the file or key, what is wrong, and how to fix it."""


class LoraTrainerError(Exception):
    """Base of every error this package raises on bad input or state."""


class ConfigError(LoraTrainerError, ValueError):
    """A configuration key or value is wrong."""


class DatasetError(LoraTrainerError):
    """A dataset folder, image or caption cannot be used."""


class ModelLoadError(LoraTrainerError):
    """A checkpoint or model folder cannot be loaded."""


class NetworkError(LoraTrainerError):
    """A LoRA file or network setting does not fit."""


class TrainingError(LoraTrainerError):
    """Training cannot go on (NaN loss, out of memory, ...)."""


class TaggerError(LoraTrainerError):
    """A tagger model or image cannot be used."""
