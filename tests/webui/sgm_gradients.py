"""Run with the WebUI's Python (argv: WebUI dir, tiny SDXL yaml, checkpoint): every LoRA parameter on sgm's SDXL
UNet gets a non-zero gradient with gradient checkpointing on. Prints one JSON line."""
import json
import sys
from pathlib import Path

a1111, yaml_path, ckpt = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
sys.path[:0] = [str(a1111 / "repositories" / "generative-models"), str(Path(__file__).resolve().parents[2])]

import open_clip
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

open_clip.add_model_config(str(Path(yaml_path).parent))
from sgm.util import instantiate_from_config

from lora_trainer.config import TrainConfig, update_config
from lora_trainer.host.handshake import borrowed_model, state_fingerprint
from lora_trainer.models.adapter import TextConditioning
from lora_trainer.models.sgm_adapter import SgmAdapter
from lora_trainer.networks import LoRANetwork

torch.manual_seed(0)
config = OmegaConf.load(yaml_path).model
config.params.conditioner_config.params.emb_models[1].params.version = None  # random weights, no download
engine = instantiate_from_config(config)
engine.load_state_dict(load_file(ckpt), strict=False)
engine.eval()
adapter = SgmAdapter(engine, model_id="tiny-sdxl")
flags = [getattr(m, "use_checkpoint", getattr(m, "checkpoint", None)) for m in engine.modules()]
before = state_fingerprint(engine)
cfg = update_config(TrainConfig(), {"network_dim": 2, "network_alpha": 2, "network_train_unet_only": True}).network
with borrowed_model(engine, adapter):
    network = LoRANetwork.create({"unet": adapter.lora_targets()["unet"]}, cfg)
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, 0.1)
    network.apply()
    network.train()
    adapter.enable_gradient_checkpointing(True)
    engine.model.diffusion_model.train()
    checkpointed = sum(type(m).__name__ in ("ResBlock", "BasicTransformerBlock") and "forward" in m.__dict__
                       for m in engine.modules())
    ctx = engine.conditioner.embedders[0].transformer.config.hidden_size + 64  # te1 width + tiny te2 width
    cond = TextConditioning(torch.randn(1, 77, ctx), torch.randn(1, 64))
    out = adapter.predict(torch.randn(1, 4, 16, 16), torch.tensor([500]), cond)
    out.square().mean().backward()
    network.remove()
params = dict(network.named_parameters())
zero = [n for n, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
after_flags = [getattr(m, "use_checkpoint", getattr(m, "checkpoint", None)) for m in engine.modules()]
print(json.dumps({"params": len(params), "zero": zero[:5], "n_zero": len(zero), "checkpointed_blocks": checkpointed,
                  "identical": state_fingerprint(engine) == before, "flags_restored": after_flags == flags}))
