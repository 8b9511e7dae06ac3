"""Hugging Face `ViTModel`, `Dinov2Model` and `Dinov2WithRegistersModel` -> `DToPBackbone`.

A model folder as `save_pretrained` writes it: `config.json` plus
`model.safetensors` (or shards with `model.safetensors.index.json`, or
`pytorch_model.bin`). The architecture comes from the config; weights are
checked key by key (`load_weight_map`). The final `layernorm`, the pooler,
the mask token and classifier weights are not used: DToP's heads read the
last block's output. Equal to the original's `hidden_states[-1]` (the
last block before the final norm), prefix tokens included.
"""

import json
import os
import re

import numpy as np

from keras_dtop.convert.checkpoints import read_state_dict
from keras_dtop.convert.vit_layout import (
    build_backbone,
    patch_positions,
    square_grid,
    target_grid,
)
from keras_dtop.convert.weight_map import (
    block_attention_entries,
    conv,
    dense_entries,
    load_weight_map,
    norm_entries,
    zero_missing_biases,
)

MODEL_TYPES = ("vit", "dinov2", "dinov2_with_registers")
# Base-model names inside task checkpoints (ViTForImageClassification: "vit.").
MODEL_PREFIXES = ("vit.", "dinov2.", "dinov2_with_registers.", "model.")
IGNORED = tuple(
    re.compile(p)
    for p in (
        r"^layernorm\.",
        r"^pooler\.",
        r"^embeddings\.mask_token$",
        r"^classifier\.",
    )
)


def read_config(folder):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        return json.load(f)


def architecture_from_config(config):
    """`DToPBackbone` keyword arguments from a Hugging Face config dict."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"Hugging Face model_type {model_type!r} is not supported: keras-dtop loads "
            f"{', '.join(MODEL_TYPES)}."
        )
    if config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(
            f"hidden_act {config['hidden_act']!r} is not supported: the backbone uses exact GELU."
        )
    if config.get("use_swiglu_ffn"):
        raise ValueError("DINOv2 with a SwiGLU MLP (use_swiglu_ffn, ViT-g) is not supported.")
    patch = config.get("patch_size", 16 if model_type == "vit" else 14)
    if isinstance(patch, (list, tuple)):
        if len(set(patch)) != 1:
            raise ValueError(f"Only square patches are supported, got patch_size {patch}.")
        patch = patch[0]
    hidden = int(config.get("hidden_size", 768))
    if model_type == "vit":
        mlp = int(config.get("intermediate_size", 4 * hidden))
    else:
        mlp = int(hidden * config.get("mlp_ratio", 4))
    architecture = dict(
        patch_size=int(patch),
        hidden_dim=hidden,
        num_layers=int(config.get("num_hidden_layers", 12)),
        num_heads=int(config.get("num_attention_heads", 12)),
        mlp_dim=mlp,
        layer_norm_epsilon=float(config.get("layer_norm_eps", 1e-12 if model_type == "vit" else 1e-6)),
        num_channels=int(config.get("num_channels", 3)),
        class_token=True,
        num_register_tokens=int(config.get("num_register_tokens", 0)),
        position_resize="bicubic_antialias" if model_type == "dinov2_with_registers" else "bicubic",
    )
    if model_type != "vit":
        architecture["layer_scale_init"] = float(config.get("layerscale_value", 1.0))
    return architecture


def read_weights(folder, trusted=False):
    """State dict of a model folder (single file or shards), base-model prefix removed."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(read_state_dict(os.path.join(folder, shard)))
    else:
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.exists(os.path.join(folder, name)):
                state = read_state_dict(os.path.join(folder, name), trusted)
                break
        else:
            raise FileNotFoundError(
                f"{folder} has config.json but no model.safetensors, "
                "model.safetensors.index.json or pytorch_model.bin."
            )
    for prefix in MODEL_PREFIXES:
        if any(k.startswith(prefix + "embeddings.") for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            break
    return state


# transformers 5 names modules differently in memory than in checkpoint files
# (`layers.0.attention.q_proj` for `encoder.layer.0.attention.attention.query`);
# state dicts taken from a live model are renamed to the file names.
_IN_MEMORY_NAMES = (
    (r"^layers\.(\d+)\.", r"encoder.layer.\1."),
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
)
_VIT_MLP_NAMES = ((r"\.mlp\.fc1\.", ".intermediate.dense."), (r"\.mlp\.fc2\.", ".output.dense."))


def checkpoint_names(state, model_type):
    """Rename a live transformers-5 state dict to checkpoint-file names (no-op for files)."""
    if not any(re.search(r"(^layers\.\d+\.|\.q_proj\.)", k) for k in state):
        return state
    rules = _IN_MEMORY_NAMES + (_VIT_MLP_NAMES if model_type == "vit" else ())
    renamed = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


def _block_entries(prefix, block, model_type):
    attention = f"{prefix}.attention"
    entries = block_attention_entries(
        (
            f"{attention}.attention.query",
            f"{attention}.attention.key",
            f"{attention}.attention.value",
            f"{attention}.output.dense",
        ),
        block,
    )
    if model_type == "vit":
        entries += norm_entries(f"{prefix}.layernorm_before", block.layer_norm_1)
        entries += norm_entries(f"{prefix}.layernorm_after", block.layer_norm_2)
        entries += dense_entries(f"{prefix}.intermediate.dense", block.mlp_dense_1)
        entries += dense_entries(f"{prefix}.output.dense", block.mlp_dense_2)
    else:
        entries += norm_entries(f"{prefix}.norm1", block.layer_norm_1)
        entries += norm_entries(f"{prefix}.norm2", block.layer_norm_2)
        entries += dense_entries(f"{prefix}.mlp.fc1", block.mlp_dense_1)
        entries += dense_entries(f"{prefix}.mlp.fc2", block.mlp_dense_2)
        entries.append((f"{prefix}.layer_scale1.lambda1", block.layer_scale_1, None))
        entries.append((f"{prefix}.layer_scale2.lambda1", block.layer_scale_2, None))
    return entries


def weight_map(backbone, model_type, checkpoint_grid):
    """`(names, variable, transform)` entries of a Hugging Face ViT / DINOv2 backbone."""
    embedding = backbone.patch_embedding
    entries = [
        ("embeddings.patch_embeddings.projection.weight", embedding.projection.kernel, conv),
        ("embeddings.patch_embeddings.projection.bias", embedding.projection.bias, None),
        (
            "embeddings.position_embeddings",
            embedding.position_embedding,
            patch_positions(1, checkpoint_grid, backbone),
        ),
    ]
    if backbone.num_prefix_tokens:  # 0 with keep_prefix_tokens=False
        # The class token with its position row, then the registers (no position).
        names = ("embeddings.cls_token", "embeddings.position_embeddings")
        names += ("embeddings.register_tokens",) * bool(backbone.num_register_tokens)
        entries.append(
            (
                names,
                embedding.prefix_tokens,
                lambda cls, pos, *reg: np.concatenate([cls[0] + pos[0, :1], *(r[0] for r in reg)]),
            )
        )
    for i, block in enumerate(backbone.encoder_blocks):
        entries += _block_entries(f"encoder.layer.{i}", block, model_type)
    return entries


def backbone_from_huggingface(
    folder, image_size=None, stage_ends=None, keep_prefix_tokens=True, trusted=False, **overrides
):
    """`DToPBackbone` from a Hugging Face ViT / DINOv2 model folder (see module docstring).

    image_size: None keeps the checkpoint's position grid (other input sizes
    are resized at call time); (H, W) resizes the table once now.
    keep_prefix_tokens: False drops the class token and registers (the
    authors' plain layout; the features then differ from the original's).
    """
    config = read_config(folder)
    architecture = architecture_from_config(config)
    ignored = IGNORED
    if not keep_prefix_tokens:
        architecture.update(class_token=False, num_register_tokens=0)
        ignored += (re.compile(r"^embeddings\.(cls_token|register_tokens)$"),)
    state = checkpoint_names(read_weights(folder, trusted), config["model_type"])
    positions = state.get("embeddings.position_embeddings")
    if positions is None:
        raise ValueError(f"{folder}: missing keys: embeddings.position_embeddings")
    side = square_grid(positions.shape[1] - 1, f"{folder} embeddings.position_embeddings")
    grid = target_grid(image_size, architecture["patch_size"], (side, side))
    backbone = build_backbone(architecture, grid, stage_ends, overrides)
    if not config.get("qkv_bias", True):  # the checkpoint stores no q, k, v biases
        state = zero_missing_biases(state, r"encoder\.layer\.\d+\.attention\.attention\.\w+\.weight$")
    entries = weight_map(backbone, config["model_type"], (side, side))
    load_weight_map(entries, state, ignored, what=f"Hugging Face checkpoint {folder}")
    return backbone
