"""Analytic FLOP count of a DToP segmenter per image (design doc §5.2-5.3).

1 FLOP = 1 multiply-add, fvcore's convention. Counted: patch embedding, every
ViT layer on the tokens it really processes, the grading heads that run, and
the final bilinear upsample. Not counted (as in fvcore): biases, softmax,
activations, adds, position embeddings, the grading rule.
"""

import numpy as np
from keras import ops


def _as_float(x):
    # NumPy float64 for host values; float32 backend tensors inside a step.
    if isinstance(x, (int, float, list, tuple, np.ndarray, np.generic)):
        return np.asarray(x, dtype=np.float64)
    return ops.cast(x, "float32")


def vit_layer_flops(tokens, dim, mlp_ratio=4.0):
    """qkv 3nD², proj nD², MLP 2r·nD², QKᵀ and AV 2n²D, two LayerNorms 10nD."""
    n = _as_float(tokens)
    return (4 + 2 * mlp_ratio) * n * dim**2 + 2 * n**2 * dim + 10 * n * dim


def grading_head_flops(tokens, dim, head_dim, num_classes, num_layers=3, mlp_ratio=4.0):
    """Input projection + LN, `num_layers` decoder layers, presence classifier."""
    n = _as_float(tokens)
    c, d = num_classes, head_dim
    projection = n * dim * d + 5 * n * d
    decoder = (6 + 2 * mlp_ratio) * c * d**2 + 2 * n * d**2 + 2 * c * n * d + 15 * c * d
    return projection + num_layers * decoder + 2 * c * d


def dtop_flops(
    alive_counts,
    image_size,
    patch_size,
    hidden_dim,
    num_layers,
    stage_ends,
    num_classes,
    head_hidden_dim,
    mlp_ratio=4.0,
    head_num_layers=3,
    head_mlp_ratio=4.0,
    include_auxiliary_heads=False,
    num_prefix_tokens=0,
):
    """FLOPs per image from the tokens each grading head saw.

    alive_counts: `(batch, stages)` tokens each head saw (`details["alive_counts"]`);
    the blocks of stage j process as many tokens as head j sees, plus the
    `num_prefix_tokens` prefix tokens (class token, registers) that every
    block runs and no head grades. With
    `include_auxiliary_heads=False` the count is the README-comparable one
    (backbone + final head); True adds the auxiliary heads a pruned model runs.
    Returns `(batch,)`: float64 NumPy for host inputs, float32 for backend
    tensors (so that `evaluate` can log it from inside a compiled step).
    """
    counts = _as_float(alive_counts)
    counts = counts.reshape(-1, len(stage_ends)) if isinstance(counts, np.ndarray) else (
        ops.reshape(counts, (-1, len(stage_ends)))
    )
    height, width = image_size
    tokens = (height // patch_size) * (width // patch_size)
    total = counts[:, 0] * 0.0 + 3.0 * patch_size**2 * hidden_dim * tokens
    first = 0
    for stage, last in enumerate(stage_ends):
        layer_tokens = counts[:, stage] + num_prefix_tokens
        total += (last - first + 1) * vit_layer_flops(layer_tokens, hidden_dim, mlp_ratio)
        first = last + 1
        is_final = stage == len(stage_ends) - 1
        if is_final or include_auxiliary_heads:
            total += grading_head_flops(
                counts[:, stage], hidden_dim, head_hidden_dim, num_classes,
                head_num_layers, head_mlp_ratio,
            )
    return total + 4.0 * num_classes * height * width


def segmenter_tokens(model, image_size):
    """Patch tokens of one `(H, W)` image for `model`'s backbone."""
    patch = model.backbone.patch_size
    return (int(image_size[0]) // patch) * (int(image_size[1]) // patch)


def dense_segmenter_flops(model, image_size):
    """FLOPs of one `(H, W)` image with every token alive (backbone + final head)."""
    full = [[segmenter_tokens(model, image_size)] * len(model.stage_ends)]
    return float(segmenter_flops(model, full, image_size)[0])


def segmenter_flops(model, alive_counts, image_size, include_auxiliary_heads=False):
    """`dtop_flops` with the sizes read from a `DToPSegmenter`."""
    backbone = model.backbone
    return dtop_flops(
        alive_counts,
        image_size,
        patch_size=backbone.patch_size,
        hidden_dim=backbone.hidden_dim,
        num_layers=backbone.num_layers,
        stage_ends=model.stage_ends,
        num_classes=model.num_classes,
        head_hidden_dim=model.head_hidden_dim,
        mlp_ratio=backbone.mlp_dim / backbone.hidden_dim,
        head_num_layers=model.head_num_layers,
        head_mlp_ratio=model.head_mlp_ratio,
        include_auxiliary_heads=include_auxiliary_heads,
        num_prefix_tokens=backbone.num_prefix_tokens,
    )
