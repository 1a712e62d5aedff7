"""HTTP routes of the LoRA tools, beside the training routes: `POST /lora_trainer/v1/tools/<tool>` for `lbw`,
`merge`, `resize`, `bake`, `extract`, `ckpt-merge`, `prune` and `inspect`. Nothing here imports the WebUI.

Every route answers the job's report as JSON (`ToolReport.to_dict`: `tool`, `written`, `preview` and the job's
figures). Without `"out"` a route previews (block table, ranks, retained energy, what pruning keeps) and writes
nothing; with it the job runs as a WebUI job and writes the new file, refusing an existing one unless
`"overwrite": true`. File names are read as the panel reads them: a relative LoRA name in the Lora folder, a
relative checkpoint name in the Stable-diffusion folder. Every input and output path, once resolved, goes through
the folder rule of an exposed WebUI (403). A bad body is a 400 naming the field (`api_body.py`).

Lists of files are JSON objects in order: `"loras": {"a.safetensors": 0.7, "b.safetensors": {"ratio": -0.4,
"weights": "OUTD"}}`.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

from lora_trainer.host.api_body import BodyField, RequestError, check_value, read_body
from lora_trainer.host.api_routes import add_json_route
from lora_trainer.host.folder_policy import FolderPolicy

logger = logging.getLogger(__name__)

PREFIX = "/lora_trainer/v1/tools"
_OUT = {"out": BodyField("path"), "overwrite": BodyField("bool", default=False)}
_RANK = BodyField("int", minimum=1, maximum=4096)
_PRECISION = BodyField("str")
FIELDS: dict[str, dict[str, BodyField]] = {
    "lbw": {"file": BodyField("path", required=True), "weights": BodyField("str", required=True), **_OUT},
    "merge": {"loras": BodyField("object", required=True), "rank": _RANK, "conv_rank": _RANK,
              "precision": BodyField("str", default="float"), **_OUT},
    "resize": {"file": BodyField("path", required=True), "rank": _RANK, "dynamic": BodyField("str"),
               "conv_rank": _RANK, "precision": _PRECISION, **_OUT},
    "bake": {"checkpoint": BodyField("path", required=True), "loras": BodyField("object", required=True),
             "precision": _PRECISION, **_OUT},
    "extract": {"tuned": BodyField("path", required=True), "base": BodyField("path", required=True),
                "dim": BodyField("int", default=4, minimum=1, maximum=4096), "conv_dim": _RANK,
                "clamp_quantile": BodyField("number", default=0.99, minimum=0.0, maximum=1.0),
                "min_diff": BodyField("number", default=0.01, minimum=0.0),
                "precision": BodyField("str", default="fp16"), **_OUT},
    "ckpt-merge": {"a": BodyField("path", required=True), "b": BodyField("path", required=True),
                   "c": BodyField("path"), "mode": BodyField("str", default="sum"),
                   "alpha": BodyField("number", default=0.5), "block_alpha": BodyField("str"),
                   "precision": _PRECISION, **_OUT},
    "prune": {"checkpoint": BodyField("path", required=True), "precision": _PRECISION, **_OUT},
    "inspect": {"file": BodyField("path", required=True)},
}
_ENTRY_FIELDS = {"ratio": BodyField("number", default=1.0), "weights": BodyField("str")}
_CHECKPOINT_OUT = ("bake", "ckpt-merge", "prune")
_LORA_PRECISIONS = ("float", "fp16", "bf16")
PRECISIONS = {"merge": _LORA_PRECISIONS, "resize": _LORA_PRECISIONS, "bake": ("fp16", "bf16", "fp32"),
              "extract": ("fp16", "bf16", "fp32"), "ckpt-merge": ("fp16", "bf16", "fp32"),
              "prune": ("fp16", "bf16", "fp32")}


def lora_entries(loras: Mapping[str, Any], route: str) -> list[tuple[str, float, str | None]]:
    """The `loras` object as (name, ratio, block weights) in order.

    Args:
        loras (Mapping[str, Any]): name -> ratio, or name -> {"ratio": number, "weights": preset or vector}.
        route (str): the route's name for messages.

    Returns:
        list[tuple[str, float, str | None]]: one entry per file.

    Raises:
        RequestError: an empty object, or an entry of the wrong type (400, naming the entry).
    """
    if not loras:
        raise RequestError('loras: empty. Send at least one file, e.g. {"loras": {"a.safetensors": 1.0}}.')
    entries = []
    for name, value in loras.items():
        field = f"loras[{name!r}]"
        if isinstance(value, dict):
            entry = read_body(value, _ENTRY_FIELDS, f"{route} {field}")
            entries.append((name, entry["ratio"], entry["weights"]))
        else:
            entries.append((name, check_value(field, value, _ENTRY_FIELDS["ratio"]), None))
    return entries


def block_alpha_values(text: str | None) -> list[float] | None:
    """`"0.5,0.5,..."` -> floats (None when not given).

    Raises:
        RequestError: a value that is not a number.
    """
    if not text:
        return None
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError as error:
        raise RequestError(f"block_alpha: {error}. Send comma-separated numbers, one per block (26 for "
                           "SD1/SD2, 20 for SDXL).") from error


class ToolsApi:
    """The tool routes over one `Tools` (the panel's jobs).

    Args:
        tools (Tools): the jobs on the host's folders (`lora_trainer.ui.tools_ckpt_actions.Tools`).
        folder_policy (callable, optional): `() -> FolderPolicy`, read at every request, defaults to None (any
            folder).
    """

    def __init__(self, tools, folder_policy: Callable[[], FolderPolicy] | None = None):
        self.tools = tools
        self.folder_policy = folder_policy or FolderPolicy

    def _paths(self, route: str, values: dict) -> dict:
        """Resolve every file field in the host's folders and check it against the folder rule."""
        policy, folders = self.folder_policy(), self.tools.folders
        resolved = dict(values)
        for name, field in FIELDS[route].items():
            if field.kind != "path" or values[name] is None:
                continue
            checkpoint = name != "file" and (name != "out" or route in _CHECKPOINT_OUT)
            path = folders.checkpoint_path(values[name]) if checkpoint else folders.lora_path(values[name])
            policy.check(name, path)
            resolved[name] = str(path)
        if "loras" in values:
            entries = []
            for i, (name, ratio, weights) in enumerate(lora_entries(values["loras"], route)):
                path = folders.lora_path(name)
                policy.check(f"loras (entry {i + 1})", path)
                entries.append((str(path), ratio, weights))
            resolved["loras"] = entries
        return resolved

    def handle(self, route: str, body: Any) -> dict[str, Any]:
        """Run one tool for a request body.

        Args:
            route (str): one of `FIELDS`.
            body (Any): the decoded JSON body.

        Returns:
            dict[str, Any]: the job's report.

        Raises:
            RequestError: a bad body (400) or a path outside the allowed folders (403).
        """
        values = read_body(body, FIELDS[route], f"tools/{route}")
        if values.get("precision") is not None and values["precision"] not in PRECISIONS[route]:
            raise RequestError(f"precision: {values['precision']!r} is unknown. Use one of "
                               f"{', '.join(PRECISIONS[route])}.")
        v = self._paths(route, values)
        t, out = self.tools, {"out": v.get("out"), "overwrite": v.get("overwrite", False)}
        if route == "lbw":
            report = t.lbw(v["file"], v["weights"], **out)
        elif route == "merge":
            report = t.merge(v["loras"], rank=v["rank"], conv_rank=v["conv_rank"], precision=v["precision"], **out)
        elif route == "resize":
            report = t.resize(v["file"], v["rank"], v["dynamic"], v["conv_rank"], precision=v["precision"], **out)
        elif route == "bake":
            report = t.bake(v["checkpoint"], v["loras"], precision=v["precision"], **out)
        elif route == "extract":
            report = t.extract(v["tuned"], v["base"], dim=v["dim"], conv_dim=v["conv_dim"],
                               clamp_quantile=v["clamp_quantile"], min_diff=v["min_diff"],
                               precision=v["precision"], **out)
        elif route == "ckpt-merge":
            report = t.ckpt_merge(v["a"], v["b"], c=v["c"], mode=v["mode"], alpha=v["alpha"],
                                  block_alpha=block_alpha_values(v["block_alpha"]), precision=v["precision"], **out)
        elif route == "prune":
            report = t.prune(v["checkpoint"], precision=v["precision"], **out)
        else:
            report = t.inspect(v["file"])
        return report.to_dict()

    def register(self, app, credentials: Mapping[str, str] | None = None) -> None:
        """Add the routes to a FastAPI app.

        Args:
            app (fastapi.FastAPI): the WebUI's app.
            credentials (Mapping[str, str], optional): user -> password required as HTTP Basic auth, defaults to
                None.
        """
        for route in FIELDS:
            add_json_route(app, f"{PREFIX}/{route}", lambda body, route=route: self.handle(route, body),
                           credentials=credentials)
        logger.info("API routes added under %s", PREFIX)


__all__ = ["FIELDS", "PRECISIONS", "PREFIX", "ToolsApi", "block_alpha_values", "lora_entries"]
