"""How a panel shows a failed action: the package's one rule (`errors.describe_error`), with bugs sent to the log."""
from __future__ import annotations

import logging

from lora_trainer.errors import BUG_NOTE, describe_error

logger = logging.getLogger(__name__)


def error_text(exc: BaseException, panel: str) -> str:
    """The message a panel shows for `exc`; an expected failure is logged at INFO, a bug with its traceback.

    Args:
        exc (BaseException): what the action raised.
        panel (str): the panel's name, for the log ("train panel", ...).

    Returns:
        str: the message (file or key, and the fix); for a bug it also says so and points to the log.
    """
    report = describe_error(exc)
    if report.expected:
        logger.info("%s: %s", panel, report.message)
        return report.message
    logger.error("%s: internal error", panel, exc_info=exc)
    return f"{report.message}. {BUG_NOTE.replace('above', 'in the log')}"
