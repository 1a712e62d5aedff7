"""`python -m lora_trainer demo`: the whole flow on a fresh CPU machine in under a minute.

Builds a tiny real-architecture SD1 checkpoint (a VAE that reconstructs, a UNet that starts as a denoiser that has
learned nothing: `build_tiny_model(identity_unet=True)`), a small synthetic captioned dataset (a red square on blue),
trains a LoRA on it, saves it in kohya's format, and writes a loss plot and a labelled grid of samples at LoRA
strength 0, 0.5 and 1 beside a training image. It prints how far the samples are from the training images at each
strength: the LoRA has learned when strength 1 is much closer than strength 0.
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
DISTANCE_SEEDS = [1234, 1]  # the grid shows the first; the distances average all of them


def add_parser(sub) -> None:
    parser = sub.add_parser("demo", help="train a LoRA on a tiny model and synthetic data (CPU, under a minute)")
    parser.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default: demo_output)")
    parser.add_argument("--steps", type=int, default=100, help="training steps (default: 100)")


def run(args) -> int:
    from lora_trainer.cli.train import report_config_keys, train
    from lora_trainer.config import load_toml
    from lora_trainer.testing.datasets import write_square_dataset
    from lora_trainer.testing.tiny_models import build_tiny_model

    if args.steps < 1:
        raise ConfigError(f"--steps {args.steps}: must be at least 1. Use e.g. --steps 100 (the default).")
    out = args.out.resolve()
    print(f"building a tiny SD1 checkpoint in {out / 'model'}")
    tiny = build_tiny_model("sd1", out / "model", seed=0, identity_unet=True)
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
    samples = write_sample_grid(loaded.config, lora_path, dataset, out / "samples.png")
    (out / "losses.json").write_text(json.dumps(losses), encoding="utf-8")
    (out / "distances.json").write_text(json.dumps({f"{k:g}": v for k, v in samples.distances.items()}),
                                        encoding="utf-8")
    print(f"LoRA: {lora_path}\nloss plot: {out / 'loss.png'}\nsamples by strength: {out / 'samples.png'}")
    print("mean distance of the samples to the nearest training image (0-255, lower is closer): "
          + ", ".join(f"strength {k:g}: {v:.1f}" for k, v in samples.distances.items()))
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


def write_sample_grid(config, lora_path: Path, dataset: Path, path: Path):
    """Sample at strength 0, 0.5, 1 (rows = prompts, a training image beside them); write the labelled grid.

    Returns:
        StrengthSamples: the images and the distance to the training images per strength.
    """
    import torch
    from PIL import Image

    from lora_trainer.cli.demo_samples import labelled_grid, load_references, sample_strengths
    from lora_trainer.models.loading import load_checkpoint_adapter
    from lora_trainer.models.sampling import SampleSettings
    from lora_trainer.networks import LoRANetwork, load_lora

    adapter = load_checkpoint_adapter(
        config.model.pretrained_model_name_or_path, config_dir=config.model.diffusers_config_dir,
        tokenizer_dir=config.model.tokenizer_dir, device="cpu", dtype=torch.float32,
    )
    network = LoRANetwork.create(adapter.lora_targets(), config.network)
    state_dict, _ = load_lora(lora_path)
    network.load_kohya(state_dict)
    network.apply()
    # guidance 3, not the usual 7: the LoRA never saw the empty prompt, and 7 pushes its samples past its colours
    settings = SampleSettings(width=64, height=64, steps=15, guidance_scale=3.0)
    images = sorted((dataset / "10_demostyle").glob("*.png"))
    references = load_references(images, (settings.width, settings.height))
    samples = sample_strengths(adapter, network, PROMPTS, DISTANCE_SEEDS, references, settings)
    network.remove()
    labelled_grid(samples, Image.open(images[0])).save(path)
    return samples
