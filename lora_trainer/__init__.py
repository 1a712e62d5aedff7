"""sd-webui-lora-trainer: tag, edit, train and reshape LoRAs inside the Stable Diffusion WebUI or standalone."""

__version__ = "0.1.0"
