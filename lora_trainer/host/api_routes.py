"""The extension's JSON routes on a FastAPI app: one place that reads bodies, maps errors to status codes and
writes answers, so every route (training now, LoRA tools later) answers the same way.

- The body is read here (`api_body.parse_json`), so malformed JSON is a 400 with our message, not FastAPI's 422.
- Errors become `{"detail": message, "error": type name}`: a `RequestError` carries its status (400, 403, 409);
  our other errors, `ValueError`, `FileNotFoundError` and `OSError` are the caller's input (400); anything else is
  a bug (500, logged with its traceback, and the message says so).
- Answers are encoded with strict JSON (no NaN/inf); an answer that cannot be encoded is a 500, never a crash.
- With credentials (the WebUI's `--api-auth user:password,...`), a request needs them as HTTP Basic auth (401
  otherwise), as the WebUI's own `/sdapi` routes do.
Handlers are plain functions, run in the server's thread pool as before.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
from typing import Any, Callable, Mapping

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from lora_trainer.errors import LoraTrainerError
from lora_trainer.host.api_body import RequestError, parse_json

logger = logging.getLogger(__name__)

_INPUT_ERRORS = (LoraTrainerError, ValueError, FileNotFoundError, OSError)


def error_status(error: BaseException) -> int:
    """The HTTP status for an error a handler raised.

    Args:
        error (BaseException): the error.

    Returns:
        int: its `status` for a RequestError, 400 for bad input, 500 for a bug.
    """
    if isinstance(error, RequestError):
        return error.status
    return 400 if isinstance(error, _INPUT_ERRORS) else 500


def json_response(data: Any, status: int = 200) -> Response:
    """Strict JSON (NaN and inf refused).

    Args:
        data (Any): JSON-ready data.
        status (int, optional): HTTP status, defaults to 200.

    Returns:
        Response: the answer.

    Raises:
        ValueError, TypeError: data JSON cannot carry.
    """
    return Response(json.dumps(data, allow_nan=False), status_code=status, media_type="application/json")


def error_response(route: str, error: BaseException) -> Response:
    """The answer for an error: its message for bad input, a "this is a bug" message otherwise.

    Args:
        route (str): the route's path, for the log and the bug message.
        error (BaseException): the error.

    Returns:
        Response: `{"detail": message, "error": type name}` with the status of `error_status`.
    """
    status = error_status(error)
    if status >= 500:
        logger.error("%s: unexpected error", route, exc_info=error)
        message = (f"{route}: unexpected {type(error).__name__} ({error}). This is a bug in the LoRA trainer; "
                   "please report it with the console log.")
    else:
        logger.info("%s: refused (%d): %s", route, status, error)
        message = str(error)
    return json_response({"detail": message, "error": type(error).__name__}, status)


def parse_credentials(text: str | None) -> dict[str, str]:
    """The users of the WebUI's `--api-auth` option.

    Args:
        text (str, optional): "user:password,user2:password2".

    Returns:
        dict[str, str]: user -> password (empty: no authentication).
    """
    users = {}
    for entry in (text or "").split(","):
        user, sep, password = entry.strip().partition(":")
        if sep and user:
            users[user] = password
    return users


def _authorized(request: Request, credentials: Mapping[str, str]) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, _, password = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    expected = credentials.get(user)
    return expected is not None and hmac.compare_digest(password.encode(), expected.encode())


def add_json_route(app, path: str, handler: Callable[..., Any], method: str = "POST",
                   credentials: Mapping[str, str] | None = None) -> None:
    """Add a route whose handler takes the decoded body (POST) or nothing (GET) and returns JSON-ready data.

    Args:
        app (fastapi.FastAPI): the app.
        path (str): the route's path.
        handler (Callable): `handler(body) -> data` for POST (body None when empty), `handler() -> data` for GET.
        method (str, optional): "POST" or "GET", defaults to "POST".
        credentials (Mapping[str, str], optional): user -> password required as HTTP Basic auth, defaults to None
            (no authentication).
    """
    async def endpoint(request: Request) -> Response:
        if credentials and not _authorized(request, credentials):
            response = json_response({"detail": f"{path}: incorrect username or password. Send the WebUI's "
                                                "--api-auth credentials as HTTP Basic auth.",
                                      "error": "Unauthorized"}, 401)
            response.headers["WWW-Authenticate"] = "Basic"
            return response
        try:
            if method == "GET":
                data = await run_in_threadpool(handler)
            else:
                data = await run_in_threadpool(handler, parse_json(await request.body()))
        except Exception as error:  # every failure becomes an answer; a bug is logged with its traceback
            return error_response(path, error)
        try:
            return json_response(data)
        except (TypeError, ValueError) as error:
            return error_response(path, RuntimeError(f"the answer cannot be written as JSON: {error}"))

    app.add_api_route(path, endpoint, methods=[method])


__all__ = ["add_json_route", "error_response", "error_status", "json_response", "parse_credentials"]
