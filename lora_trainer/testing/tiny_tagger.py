"""Small WD14-shaped ONNX tagger models built from scratch (no download), for tests and benchmarks.

Input `[N, S, S, 3]` float32 (BGR, 0..255), output `[N, T]` sigmoid probabilities, plus a `selected_tags.csv`.
The tiny model's tags are designed functions of the input so that tests can check preprocessing: `red_theme`
fires on a red image only when channels arrive in BGR order, `white_background` on white, the character
`hatsune_miku` on green and `saber_(fate)` on blue. Others have a fixed bias plus a small random conv term.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

# (name, category, bias, {feature: weight}); features: mean of B, G, R over the image ("B", "G", "R") and 4 random
# conv features ("c0".."c3"). Rows are deliberately not sorted by category.
TINY_TAGS: list[tuple[str, int, float, dict[str, float]]] = [
    ("general", 9, 1.5, {}),
    ("long_hair", 0, 0.4, {"c0": 1.0, "c1": -1.0}),
    ("hatsune_miku", 4, 0.0, {"G": 16.0, "R": -16.0, "B": -16.0}),
    ("red_theme", 0, -2.0, {"R": 12.0, "B": -12.0}),
    ("sensitive", 9, -1.0, {}),
    ("^_^", 0, 1.0, {}),
    ("saber_(fate)", 4, 0.0, {"B": 16.0, "R": -16.0, "G": -16.0}),
    ("white_background", 0, -14.0, {"B": 6.0, "G": 6.0, "R": 6.0}),
    ("blue_theme", 0, -2.0, {"B": 12.0, "R": -12.0}),
    ("questionable", 9, -2.0, {}),
    (">_<", 0, 0.05, {}),
    ("hair_ornament", 0, -0.6, {"c2": 1.0, "c3": 0.5}),
    ("explicit", 9, -3.0, {}),
    ("bow_(weapon)", 0, 0.2, {}),
    ("smile", 0, -0.2, {"c1": 0.8}),
    ("1girl", 0, 2.0, {}),
    ("simple_background", 0, -0.85, {}),
]
_FEATURES = ["B", "G", "R", "c0", "c1", "c2", "c3"]


def write_tags_csv(path: Path, tags: list[tuple[str, int]]) -> None:
    """Write a selected_tags.csv (`tag_id,name,category,count`) for (name, category) rows."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["tag_id", "name", "category", "count"])
        for i, (name, category) in enumerate(tags):
            writer.writerow([1000 + i, name, category, 10000 - i])


def _save(graph, folder: Path):
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))


def _io(batch: int | None, size: int, outputs: int):
    from onnx import TensorProto, helper

    n = batch if batch else "batch"
    return (helper.make_tensor_value_info("input", TensorProto.FLOAT, [n, size, size, 3]),
            helper.make_tensor_value_info("output", TensorProto.FLOAT, [n, outputs]))


def build_tiny_tagger(folder: str | Path, *, batch: int | None = None, size: int = 448, seed: int = 0,
                      num_outputs: int | None = None, write_csv: bool = True) -> Path:
    """Build the tiny designed tagger (TINY_TAGS) in `folder`.

    Args:
        folder (str | Path): created if needed.
        batch (int, optional): a fixed batch size (e.g. 1, like some v2 exports); None = dynamic batch (like v3).
        size (int, optional): input side, defaults to 448.
        seed (int, optional): seed of the random conv features.
        num_outputs (int, optional): make the model give this many outputs (a broken model), defaults to the tags.
        write_csv (bool, optional): write selected_tags.csv, defaults to True.

    Returns:
        Path: the model folder.
    """
    from onnx import helper, numpy_helper

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    t = num_outputs or len(TINY_TAGS)
    weights = np.zeros((len(_FEATURES), t), np.float32)
    bias = np.zeros(t, np.float32)
    for j, (_, _, b, w) in enumerate(TINY_TAGS[:t]):
        bias[j] = b
        for feature, value in w.items():
            weights[_FEATURES.index(feature), j] = value
    conv_w = (rng.standard_normal((4, 3, 8, 8)) * 0.08).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (np.array(1 / 255, np.float32), "scale"), (conv_w, "conv_w"), (np.array([2, 3], np.int64), "hw_axes"),
        (weights, "fc_w"), (bias, "fc_b")]]
    nodes = [
        helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Mul", ["nchw", "scale"], ["x"]),
        helper.make_node("ReduceMean", ["x", "hw_axes"], ["means"], keepdims=0),
        helper.make_node("Conv", ["x", "conv_w"], ["conv"], strides=[8, 8]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("ReduceMean", ["relu", "hw_axes"], ["conv_means"], keepdims=0),
        helper.make_node("Concat", ["means", "conv_means"], ["features"], axis=1),
        helper.make_node("Gemm", ["features", "fc_w", "fc_b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["output"]),
    ]
    graph = helper.make_graph(nodes, "tiny_tagger", *[[v] for v in _io(batch, size, t)], initializer=inits)
    _save(graph, folder)
    if write_csv:
        write_tags_csv(folder / "selected_tags.csv", [(n, c) for n, c, _, _ in TINY_TAGS])
    return folder


def build_convnet_tagger(folder: str | Path, *, size: int = 448, num_tags: int = 2000, width: int = 32,
                         seed: int = 0) -> Path:
    """A dynamic-batch convnet tagger of realistic cost (4 stride-2 3x3 conv layers + 3x3 convs, random weights).

    With width 32 the convs cost about 2 GMAC per 448 px image, in the range of the smaller real taggers' tens of
    ms per image on a desktop CPU. Its tags are `tag_0..` with every 50th a character and the first four ratings.

    Args:
        folder (str | Path): created if needed.
        size (int, optional): input side, defaults to 448.
        num_tags (int, optional): outputs, defaults to 2000.
        width (int, optional): channels of the first layer (doubled at each stride), defaults to 32.
        seed (int, optional): weight seed.

    Returns:
        Path: the model folder.
    """
    from onnx import helper, numpy_helper

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(np.array(1 / 255, np.float32), "scale")]
    nodes = [helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2]),
             helper.make_node("Mul", ["nchw", "scale"], ["x0"])]
    c_in, x = 3, "x0"
    for i, (c_out, stride) in enumerate([(width, 2), (width * 2, 2), (width * 2, 1), (width * 4, 2),
                                         (width * 4, 1), (width * 8, 2), (width * 8, 1)]):
        w = (rng.standard_normal((c_out, c_in, 3, 3)) * np.sqrt(2.0 / (9 * c_in))).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(c_out, np.float32), f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], strides=[stride, stride],
                                   pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        c_in, x = c_out, f"r{i}"
    fc = (rng.standard_normal((c_in, num_tags)) * 0.05).astype(np.float32)
    inits += [numpy_helper.from_array(fc, "fc_w"), numpy_helper.from_array(np.full(num_tags, -1.0, np.float32), "fc_b"),
              numpy_helper.from_array(np.array([2, 3], np.int64), "hw_axes")]
    nodes += [helper.make_node("ReduceMean", [x, "hw_axes"], ["pooled"], keepdims=0),
              helper.make_node("Gemm", ["pooled", "fc_w", "fc_b"], ["logits"]),
              helper.make_node("Sigmoid", ["logits"], ["output"])]
    graph = helper.make_graph(nodes, "convnet_tagger", *[[v] for v in _io(None, size, num_tags)], initializer=inits)
    _save(graph, folder)
    tags = [(f"tag_{i}", 9 if i < 4 else (4 if i % 50 == 0 else 0)) for i in range(num_tags)]
    write_tags_csv(folder / "selected_tags.csv", tags)
    return folder
