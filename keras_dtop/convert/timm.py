"""timm `VisionTransformer` state dicts (ViT, DeiT, DINOv2, with registers) -> `DToPBackbone`.

timm is not imported (its wheels pull a CUDA torchvision): the architecture
is read from the tensor shapes. Names: `patch_embed.proj`, `cls_token`,
`reg_token`, `pos_embed`, `blocks.{i}.norm1 / attn.qkv / attn.proj / ls1.gamma
/ norm2 / mlp.fc1 / mlp.fc2 / ls2.gamma`. The final `norm`, `fc_norm` and
`head` are not used (DToP's heads read the last block's output). timm
resizes position embeddings with antialiased bicubic, so the backbone does
too (`position_resize="bicubic_antialias"`).

`pos_embed` may cover every prefix token (timm's default), only the class
token (DINOv2 checkpoints with registers) or none (`no_embed_class=True`);
which one is read from its length.
"""

import math
import re

import numpy as np

from keras_dtop.convert.vit_layout import build_backbone, patch_positions, target_grid
from keras_dtop.convert.weight_map import (
    conv,
    count_indexed,
    dense_entries,
    heads_out,
    load_weight_map,
    norm_entries,
    packed_attention_entries,
    zero_missing_biases,
)

IGNORED = tuple(
    re.compile(p) for p in (r"^norm\.", r"^fc_norm\.", r"^head\.", r"^head_drop\.", r"^mask_token$")
)
HEAD_DIM = 64  # every timm ViT / DINOv2 size uses 64-wide attention heads


def _prefix_positions(state, num_prefix):
    """How many prefix tokens have a row in `pos_embed`, and the patch grid side."""
    length = state["pos_embed"].shape[1]
    for covered in dict.fromkeys((num_prefix, 1 if "cls_token" in state else 0, 0)):
        side = math.isqrt(max(length - covered, 0))
        if side and side * side == length - covered:
            return covered, side
    raise ValueError(
        f"timm pos_embed: {length} rows are no square grid of patches after "
        f"{num_prefix}, 1 or 0 prefix-token rows."
    )


def architecture_from_state_dict(state, num_heads=None):
    """`DToPBackbone` keyword arguments read from a timm state dict's shapes."""
    if "backbone.patch_embed.projection.weight" in state:
        raise ValueError(
            "This is a checkpoint of the authors' mmsegmentation DToP, not a timm ViT: "
            "load it with keras_dtop.convert.segmenter_from_authors_checkpoint."
        )
    for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight"):
        if key not in state:
            raise ValueError(f"Not a timm ViT state dict: missing keys: {key}")
    hidden, channels, patch, patch_w = state["patch_embed.proj.weight"].shape
    if patch != patch_w:
        raise ValueError(f"Only square patches are supported, got {patch}x{patch_w}.")
    if "blocks.0.mlp.fc1_g.weight" in state or "blocks.0.mlp.w12.weight" in state:
        raise ValueError("timm ViTs with a SwiGLU MLP are not supported.")
    return dict(
        patch_size=int(patch),
        hidden_dim=int(hidden),
        num_layers=count_indexed(state, r"blocks\.(\d+)\."),
        num_heads=int(num_heads) if num_heads else max(1, int(hidden) // HEAD_DIM),
        mlp_dim=int(state["blocks.0.mlp.fc1.weight"].shape[0]),
        layer_norm_epsilon=1e-6,
        num_channels=int(channels),
        class_token="cls_token" in state,
        num_register_tokens=int(state["reg_token"].shape[1]) if "reg_token" in state else 0,
        layer_scale_init=1.0 if "blocks.0.ls1.gamma" in state else None,
        position_resize="bicubic_antialias",
    )


def _prefix_entry(backbone, covered):
    names = [n for n, present in (("cls_token", backbone.class_token), ("reg_token", backbone.num_register_tokens)) if present]

    def transform(*arrays):
        tokens = np.concatenate([a.reshape(-1, a.shape[-1]) for a in arrays[:-1]])
        positions = arrays[-1].reshape(-1, arrays[-1].shape[-1])[:covered]
        return tokens + np.pad(positions, ((0, len(tokens) - covered), (0, 0)))

    return (tuple(names) + ("pos_embed",), backbone.patch_embedding.prefix_tokens, transform)


def weight_map(backbone, covered, checkpoint_grid):
    """`(names, variable, transform)` entries of a timm ViT backbone."""
    embedding = backbone.patch_embedding
    entries = [
        ("patch_embed.proj.weight", embedding.projection.kernel, conv),
        ("patch_embed.proj.bias", embedding.projection.bias, None),
        ("pos_embed", embedding.position_embedding, patch_positions(covered, checkpoint_grid, backbone)),
    ]
    if backbone.num_prefix_tokens:
        entries.append(_prefix_entry(backbone, covered))
    for i, block in enumerate(backbone.encoder_blocks):
        prefix = f"blocks.{i}"
        layers = (block.query_dense, block.key_dense, block.value_dense)
        entries += packed_attention_entries(
            f"{prefix}.attn.qkv.weight", f"{prefix}.attn.qkv.bias", layers, block.num_heads
        )
        entries.append(
            (f"{prefix}.attn.proj.weight", block.output_dense.kernel, lambda w, b=block: heads_out(w, b.num_heads))
        )
        entries.append((f"{prefix}.attn.proj.bias", block.output_dense.bias, None))
        entries += norm_entries(f"{prefix}.norm1", block.layer_norm_1)
        entries += norm_entries(f"{prefix}.norm2", block.layer_norm_2)
        entries += dense_entries(f"{prefix}.mlp.fc1", block.mlp_dense_1)
        entries += dense_entries(f"{prefix}.mlp.fc2", block.mlp_dense_2)
        if block.layer_scale_init is not None:
            entries.append((f"{prefix}.ls1.gamma", block.layer_scale_1, None))
            entries.append((f"{prefix}.ls2.gamma", block.layer_scale_2, None))
    return entries


def backbone_from_timm(
    state, image_size=None, stage_ends=None, num_heads=None, keep_prefix_tokens=True, **overrides
):
    """`DToPBackbone` from a timm ViT / DINOv2 state dict (`{name: array}`).

    num_heads: attention heads (not stored in a state dict); default
    `hidden_dim // 64`, right for every timm ViT and DINOv2 size.
    image_size: None keeps the checkpoint's position grid; (H, W) resizes it now.
    keep_prefix_tokens: False drops the class token and registers.
    """
    architecture = architecture_from_state_dict(state, num_heads)
    num_prefix = int(architecture["class_token"]) + architecture["num_register_tokens"]
    covered, side = _prefix_positions(state, num_prefix)
    ignored = IGNORED
    if not keep_prefix_tokens:
        architecture.update(class_token=False, num_register_tokens=0)
        ignored += (re.compile(r"^(cls_token|reg_token)$"),)
    grid = target_grid(image_size, architecture["patch_size"], (side, side))
    backbone = build_backbone(architecture, grid, stage_ends, overrides)
    entries = weight_map(backbone, covered, (side, side))
    state = zero_missing_biases(state, r"blocks\.\d+\.attn\.qkv\.weight$")  # qkv_bias=False models
    load_weight_map(entries, state, ignored, what="timm state dict")
    return backbone
