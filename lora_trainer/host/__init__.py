"""Hosts a training job runs in: the WebUI (`host.a1111`, imported only inside the WebUI) or none
(`StandaloneHost`). `Host`/`JobHandle` are the contract (`host.base`)."""
from lora_trainer.host.base import Host, JobHandle
from lora_trainer.host.standalone import StandaloneHost, StandaloneJobHandle

__all__ = ["Host", "JobHandle", "StandaloneHost", "StandaloneJobHandle"]
