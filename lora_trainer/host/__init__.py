"""Hosts a training job runs in: the WebUI (`host.a1111`; Forge: `host.forge`; imported only inside them, picked
by `detect_host`) or none (`StandaloneHost`). `Host`/`JobHandle` are the contract (`host.base`). The checks every
HTTP route shares are WebUI-free: request bodies (`host.api_body`), the folder rule of an exposed WebUI
(`host.folder_policy`) and the FastAPI glue (`host.api_routes`, imported on its own: it needs starlette)."""
from lora_trainer.host.api_body import BodyField, RequestError, read_body
from lora_trainer.host.base import Host, JobHandle
from lora_trainer.host.detect import HOSTS, HostKind, detect_host
from lora_trainer.host.folder_policy import FolderPolicy, PathNotAllowedError, is_exposed
from lora_trainer.host.standalone import StandaloneHost, StandaloneJobHandle

__all__ = ["HOSTS", "BodyField", "FolderPolicy", "Host", "HostKind", "JobHandle", "PathNotAllowedError", "RequestError",
           "StandaloneHost", "StandaloneJobHandle", "detect_host", "is_exposed", "read_body"]
