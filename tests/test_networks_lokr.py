"""LoKr: LyCORIS's factorization, the delta as the WebUI rebuilds it from the saved keys, scale rules, config."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_trainer.errors import NetworkError
from lora_trainer.networks import LoRANetwork, build_metadata, TrainingFacts
from lora_trainer.networks.functional import factorization


@pytest.mark.parametrize("dimension, factor, expected", [
    (256, -1, (16, 16)), (128, -1, (8, 16)), (127, -1, (1, 127)), (320, -1, (16, 20)), (768, -1, (24, 32)),
    (128, 4, (4, 32)), (128, 8, (8, 16)), (1280, 8, (8, 160)), (12, 5, (3, 4)),
])
def test_factorization_matches_lycoris_examples(dimension, factor, expected):
    assert factorization(dimension, factor) == expected


def _webui_delta(sd: dict, name: str, shape) -> torch.Tensor:
    """The WebUI's Lora extension (network_lokr.py): w2 from its pair when it has one, kron with w1 (unsqueezed for
    a 4-D w2), scale alpha / dim only when a low-rank factor gives a dim, else 1."""
    w1 = sd[f"{name}.lokr_w1"].float()
    if f"{name}.lokr_w2" in sd:
        w2, dim = sd[f"{name}.lokr_w2"].float(), None
    else:
        w2, dim = sd[f"{name}.lokr_w2_a"].float() @ sd[f"{name}.lokr_w2_b"].float(), sd[f"{name}.lokr_w2_b"].shape[0]
    if w2.dim() == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    delta = torch.kron(w1, w2).reshape(shape)
    scale = float(sd[f"{name}.alpha"]) / dim if dim else 1.0
    return delta * scale


@pytest.mark.parametrize("layer, dim, factor", [
    (nn.Linear(64, 48), 2, -1), (nn.Linear(64, 48), 16, -1), (nn.Conv2d(32, 16, 3, padding=1), 2, 4),
    (nn.Conv2d(32, 16, 3, padding=1), 8, -1), (nn.Conv2d(16, 32, 1), 1, -1),
])
def test_saved_keys_rebuild_the_trained_delta_as_the_webui_does(layer, dim, factor):
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    cfg = type("Cfg", (), dict(algo="lokr", network_dim=dim, network_alpha=dim / 2, conv_dim=dim,
                               conv_alpha=dim / 2, network_args=[f"factor={factor}"]))()
    network = LoRANetwork.create({"unet": {name: layer}}, cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    module = network.loras[name]
    sd = network.state_dict_kohya(dtype=torch.float32)
    torch.testing.assert_close(_webui_delta(sd, name, layer.weight.shape), module.delta_weight())
    x = torch.randn(2, 64) if isinstance(layer, nn.Linear) else torch.randn(2, layer.in_channels, 6, 6)
    with torch.no_grad():
        base = layer(x)
        network.apply()
        out = layer(x)
        network.remove()
        merged = (nn.functional.linear(x, module.delta_weight()) if isinstance(layer, nn.Linear)
                  else nn.functional.conv2d(x, module.delta_weight(), padding=layer.padding))
    torch.testing.assert_close(out, base + merged, rtol=1e-4, atol=1e-4)


def test_fresh_lokr_is_a_no_op_and_low_rank_only_when_the_rank_is_small():
    layer = nn.Linear(64, 48)
    make = lambda dim: LoRANetwork.create(  # noqa: E731
        {"unet": {"lora_unet_a": layer}}, type("Cfg", (), dict(algo="lokr", network_dim=dim, network_alpha=1))())
    small, large = make(2), make(16)
    assert set(small.state_dict_kohya()) == {"lora_unet_a.lokr_w1", "lora_unet_a.lokr_w2_a", "lora_unet_a.lokr_w2_b",
                                              "lora_unet_a.alpha"}
    assert set(large.state_dict_kohya()) == {"lora_unet_a.lokr_w1", "lora_unet_a.lokr_w2", "lora_unet_a.alpha"}
    assert float(large.state_dict_kohya()["lora_unet_a.alpha"]) == 16  # full factors: scale 1, alpha = dim
    for network in (small, large):
        assert torch.count_nonzero(network.loras["lora_unet_a"].delta_weight()) == 0


def test_decomposed_w1_is_refused_by_name():
    layer = nn.Linear(64, 48)
    sd = {"lora_unet_a.lokr_w1_a": torch.zeros(6, 2), "lora_unet_a.lokr_w1_b": torch.zeros(2, 8),
          "lora_unet_a.lokr_w2": torch.zeros(8, 8), "lora_unet_a.alpha": torch.tensor(2.0)}
    with pytest.raises(NetworkError, match="lora_unet_a: LoKr keys"):
        LoRANetwork.from_kohya({"unet": {"lora_unet_a": layer}}, sd)


def test_lokr_config_trains_with_lycoris_module_name():
    from lora_trainer.config import config_from_dict

    loaded = config_from_dict({"network_module": "lycoris.kohya", "network_args": ["algo=lokr", "factor=8"],
                               "network_dim": 8})
    network = loaded.config.network
    assert (network.effective_algo, network.network_args) == ("lokr", ("factor=8",))
    meta = build_metadata(loaded.config, TrainingFacts(), "sd1")
    assert meta["ss_network_module"] == "lycoris.kohya" and '"algo": "lokr"' in meta["ss_network_args"]
    assert '"factor": "8"' in meta["ss_network_args"]
    with pytest.raises(Exception, match="algo lokr needs LyCORIS"):
        config_from_dict({"network_module": "networks.lora", "algo": "lokr"})


def test_lokr_with_conv_trains_on_a_tiny_model_and_its_file_reloads(tiny_sd1, tmp_path, single_thread):
    from lora_trainer.config import TrainConfig, update_config
    from lora_trainer.models.loading import load_checkpoint_adapter
    from lora_trainer.networks import load_lora
    from lora_trainer.testing.datasets import write_square_dataset
    from lora_trainer.train import Trainer

    adapter = load_checkpoint_adapter(tiny_sd1.checkpoint, config_dir=tiny_sd1.config_dir,
                                      tokenizer_dir=tiny_sd1.tokenizer_dir, device="cpu", dtype=torch.float32)
    config = update_config(TrainConfig(), dict(
        pretrained_model_name_or_path=str(tiny_sd1.checkpoint), train_data_dir=str(write_square_dataset(tmp_path)),
        resolution=(64, 64), output_dir=str(tmp_path / "out"), output_name="k", max_train_steps=3,
        learning_rate=1e-2, seed=7, network_module="lycoris.kohya", network_args=["algo=lokr", "factor=4"],
        network_dim=2, network_alpha=1, conv_dim=2, conv_alpha=1, save_precision="float"))
    result = Trainer(config, adapter).run()
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    sd, meta = load_lora(result.lora_path)
    assert meta["ss_network_module"] == "lycoris.kohya"
    suffixes = {key.split(".", 1)[1] for key in sd}
    assert {"lokr_w1", "alpha"} <= suffixes and suffixes <= {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}
    assert any(".lokr_w2" in key and "resnets" in key for key in sd)                 # 3x3 convs trained too
    assert any(torch.count_nonzero(sd[key]) for key in sd if key.endswith(("lokr_w2", "lokr_w2_b")))
    probe = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = adapter.encode_captions(["square"])
    with torch.no_grad():
        base = adapter.predict(probe, torch.tensor([400]), cond)
        network = LoRANetwork.from_kohya(adapter.lora_targets(True), sd)
        network.apply()
        with_lora = adapter.predict(probe, torch.tensor([400]), cond)
        network.remove()
        assert torch.equal(adapter.predict(probe, torch.tensor([400]), cond), base)
    assert not torch.allclose(with_lora, base)
