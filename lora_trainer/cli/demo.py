"""`python -m lora_trainer demo`: the whole flow on a fresh CPU machine in about two minutes.

Builds a tiny real-architecture SD1 checkpoint, a small synthetic captioned dataset, trains a LoRA on it, saves
it in kohya's format, and writes a loss plot and a before/after sample grid.
"""
from __future__ import annotations

import json
from pathlib import Path

from lora_trainer.errors import ConfigError

DEMO_CONFIG = """\
# Written by `python -m lora_trainer demo`: repeat the run with `python -m lora_trainer train --config {config}`.
pretrained_model_name_or_path = "{checkpoint}"
diffusers_config_dir = "{config_dir}"
tokenizer_dir = "{tokenizer_dir}"
train_data_dir = "{dataset}"
output_dir = "{output}"
output_name = "demo_lora"
resolution = "64,64"
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 128
network_module = "networks.lora"
network_dim = 8
network_alpha = 8
optimizer_type = "AdamW"
learning_rate = 1e-3
unet_lr = 1e-3
text_encoder_lr = 5e-4
lr_scheduler = "cosine"
lr_warmup_steps = 0.05
max_train_steps = {steps}
train_batch_size = 4
save_every_n_steps = {save_every}
cache_latents = true
shuffle_caption = true
keep_tokens = 1
seed = 42
mixed_precision = "no"
save_precision = "fp16"
"""

PROMPTS = ["demostyle, red square, blue background", "demostyle, red square"]


def add_parser(sub) -> None:
    parser = sub.add_parser("demo", help="train a LoRA on a tiny model and synthetic data (CPU, ~2 minutes)")
    parser.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default: demo_output)")
    parser.add_argument("--steps", type=int, default=150, help="training steps (default: 150)")


def run(args) -> int:
    from lora_trainer.cli.train import report_config_keys, train
    from lora_trainer.config import load_toml
    from lora_trainer.testing.datasets import write_square_dataset
    from lora_trainer.testing.tiny_models import build_tiny_model

    if args.steps < 1:
        raise ConfigError(f"--steps {args.steps}: must be at least 1. Use e.g. --steps 150 (the default).")
    out = args.out.resolve()
    print(f"building a tiny SD1 checkpoint in {out / 'model'}")
    tiny = build_tiny_model("sd1", out / "model", seed=0)
    dataset = write_square_dataset(out / "dataset", folder="10_demostyle", count=12,
                                   caption="demostyle, red square, blue background")
    config_path = out / "demo.toml"
    config_path.write_text(DEMO_CONFIG.format(
        config=config_path, checkpoint=tiny.checkpoint, config_dir=tiny.config_dir, tokenizer_dir=tiny.tokenizer_dir,
        dataset=dataset, output=out / "lora", steps=args.steps, save_every=max(1, args.steps // 3),
    ), encoding="utf-8")
    loaded = load_toml(config_path)
    report_config_keys(loaded)
    losses: list[float] = []
    status = train(loaded.config, "cpu", extra_subscribers=[_collect_losses(losses)])
    if status != 0:
        return status
    lora_path = out / "lora" / "demo_lora.safetensors"
    write_loss_plot(losses, out / "loss.png")
    write_sample_grid(loaded.config, lora_path, dataset, out / "samples.png")
    (out / "losses.json").write_text(json.dumps(losses), encoding="utf-8")
    print(f"LoRA: {lora_path}\nloss plot: {out / 'loss.png'}\nbefore/after grid: {out / 'samples.png'}")
    return 0


def _collect_losses(losses: list[float]):
    def subscriber(event) -> None:
        if type(event).__name__ == "Step":
            losses.append(float(event.loss))

    return subscriber


def write_loss_plot(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    window = 10
    smoothed = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                for i in range(len(losses))]
    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
    axes.plot(losses, alpha=0.35, label="loss")
    axes.plot(smoothed, label=f"mean of {window}")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_sample_grid(config, lora_path: Path, dataset: Path, path: Path) -> None:
    """Rows = prompts; columns = LoRA strength 0 (before), 0.5, 1.0 (after), and a training image."""
    import torch
    from PIL import Image

    from lora_trainer.models.loading import load_checkpoint_adapter
    from lora_trainer.models.sampling import SampleSettings, image_grid, sample_images
    from lora_trainer.networks import LoRANetwork, load_lora

    adapter = load_checkpoint_adapter(
        config.model.pretrained_model_name_or_path, config_dir=config.model.diffusers_config_dir,
        tokenizer_dir=config.model.tokenizer_dir, device="cpu", dtype=torch.float32,
    )
    network = LoRANetwork.create(adapter.lora_targets(), config.network)
    state_dict, _ = load_lora(lora_path)
    network.load_kohya(state_dict)
    network.apply()
    settings = SampleSettings(width=64, height=64, steps=20)
    reference = Image.open(sorted((dataset / "10_demostyle").glob("*.png"))[0]).convert("RGB")
    rows = []
    for prompt in PROMPTS:
        row = []
        for strength in (0.0, 0.5, 1.0):
            network.multiplier = strength
            row.extend(sample_images(adapter, [prompt], seed=1234, settings=settings))
        rows.append(row + [reference])
    network.remove()
    grid = image_grid(rows)
    grid.resize((grid.width * 4, grid.height * 4), Image.NEAREST).save(path)
