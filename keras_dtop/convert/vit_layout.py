"""Pieces every ViT checkpoint converter shares: sizes, position tables, the backbone.

Checkpoints store one position embedding per patch of a square training grid
(plus, in front, the class token's, and for timm every prefix token's). Our
`PatchEmbedding` keeps the patch table `(grid_h, grid_w, D)` and folds each
prefix token's position into the token itself.
"""

import math

import numpy as np
from keras import ops

from keras_dtop.layers.patch_embedding import bicubic_resize_matrix


def square_grid(num_positions, what):
    """Side of a square grid of `num_positions` patches, or a ValueError naming `what`."""
    side = math.isqrt(int(num_positions))
    if side * side != num_positions or side == 0:
        raise ValueError(
            f"{what}: {num_positions} patch position embeddings do not form a square grid."
        )
    return side


def resize_positions(table, embedding):
    """`(h, w, D)` position table -> `embedding`'s `(grid_h, grid_w, D)`, resized as it resizes."""
    table = np.asarray(table, dtype=np.float32)
    grid = embedding.grid_size
    antialias = embedding.position_resize == "bicubic_antialias"
    if tuple(table.shape[:2]) == tuple(grid):
        return table
    rows = ops.convert_to_numpy(bicubic_resize_matrix(grid[0], table.shape[0], antialias=antialias))
    cols = ops.convert_to_numpy(bicubic_resize_matrix(grid[1], table.shape[1], antialias=antialias))
    return np.einsum("ih,jw,hwd->ijd", rows, cols, table)


def target_grid(image_size, patch_size, checkpoint_grid):
    """The grid the loaded position table is laid out for: the checkpoint's,
    or `image_size // patch_size` (the table is resized once, at loading)."""
    if image_size is None:
        return tuple(checkpoint_grid)
    image_size = tuple(int(s) for s in image_size)
    if len(image_size) != 2 or any(s < patch_size or s % patch_size for s in image_size):
        raise ValueError(
            f"image_size must be (H, W), positive multiples of the patch size {patch_size}, "
            f"got {image_size}."
        )
    return (image_size[0] // patch_size, image_size[1] // patch_size)


def patch_positions(num_prefix_positions, checkpoint_grid, backbone):
    """Transform: checkpoint `(1, prefix + h·w, D)` positions -> the backbone's patch table."""

    def transform(positions):
        table = positions.reshape(-1, positions.shape[-1])[num_prefix_positions:]
        return resize_positions(table.reshape(*checkpoint_grid, -1), backbone.patch_embedding)

    return transform


def build_backbone(architecture, grid, stage_ends, overrides):
    """A `DToPBackbone` from a converter's architecture dict and the table grid."""
    from keras_dtop.models.backbone import DToPBackbone

    config = dict(architecture)
    patch = config["patch_size"]
    config["image_size"] = (grid[0] * patch, grid[1] * patch)
    config.update(overrides)
    return DToPBackbone(stage_ends=stage_ends, **config)
