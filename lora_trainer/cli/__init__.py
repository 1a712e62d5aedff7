"""Command-line entry points. Each subcommand is a module here with `add_parser(subparsers)` and `run(args)`."""

# Imported lazily so that `python -m lora_trainer tags ...` does not pay for torch or gradio.
COMMANDS = {
    "train": "lora_trainer.cli.train",
    "demo": "lora_trainer.cli.demo",
    "tag": "lora_trainer.cli.tag",
    "tags": "lora_trainer.cli.tags",
    "ui": "lora_trainer.cli.ui",
    "grid": "lora_trainer.cli.grid",
    "lbw": "lora_trainer.cli.lbw",
    "merge": "lora_trainer.cli.merge",
    "resize": "lora_trainer.cli.resize",
    "inspect": "lora_trainer.cli.inspect",
    "bake": "lora_trainer.cli.bake",
    "extract": "lora_trainer.cli.extract",
    "ckpt-merge": "lora_trainer.cli.ckpt_merge",
    "prune": "lora_trainer.cli.prune",
}
