"""Load state dicts of the authors' mmsegmentation DToP code into `DToPSegmenter`.

Names and layouts are listed in `shared/fixtures/authors-dtop/README.md`:
torch `Linear` weights are `(out, in)`, convolutions `(out, in, kh, kw)`,
`nn.MultiheadAttention` packs q, k, v in `in_proj_weight`. Each small function
below maps one module; `load_authors_state_dict` checks that every variable
is written once and every state-dict entry is used.
"""

import re

import numpy as np

from keras_dtop.convert.weight_map import (
    conv,
    count_indexed,
    dense_entries as _dense,
    heads_out,
    load_weight_map,
    norm_entries as _norm,
    packed_attention_entries,
    to_numpy as _to_numpy,
)

# Entries that exist in the authors' state dicts but carry no inference weights.
IGNORED_KEYS = (
    re.compile(r"^backbone\.cls_token$"),
    re.compile(r".*\.loss_decode\..*"),
)


def _packed_attention(prefix, layers, num_heads):
    """torch `nn.MultiheadAttention` (q, k, v stacked in `in_proj_*`, then
    `out_proj`) -> query/key/value/output `EinsumDense` layers, keras MHA layout."""
    query, key, value, output = layers
    entries = packed_attention_entries(
        f"{prefix}.in_proj_weight", f"{prefix}.in_proj_bias", (query, key, value), num_heads
    )
    entries.append(
        (f"{prefix}.out_proj.weight", output.kernel, lambda w: heads_out(w, num_heads))
    )
    entries.append((f"{prefix}.out_proj.bias", output.bias, None))
    return entries


def _encoder_block(prefix, block):
    layers = (block.query_dense, block.key_dense, block.value_dense, block.output_dense)
    entries = _packed_attention(f"{prefix}.attn.attn", layers, block.num_heads)
    entries += _norm(f"{prefix}.ln1", block.layer_norm_1)
    entries += _norm(f"{prefix}.ln2", block.layer_norm_2)
    entries += _dense(f"{prefix}.ffn.layers.0.0", block.mlp_dense_1)
    entries += _dense(f"{prefix}.ffn.layers.1", block.mlp_dense_2)
    return entries


def _backbone(backbone):
    embedding = backbone.patch_embedding
    grid_h, grid_w = embedding.grid_size

    def positions(pos):  # (1, 1 + N, D), slot 0 belongs to the unused class token
        return pos[0, 1:].reshape(grid_h, grid_w, pos.shape[-1])

    entries = [
        (
            "backbone.patch_embed.projection.weight",
            embedding.projection.kernel,
            conv,
        ),
        ("backbone.patch_embed.projection.bias", embedding.projection.bias, None),
        ("backbone.pos_embed", embedding.position_embedding, positions),
    ]
    for i, block in enumerate(backbone.encoder_blocks):
        entries += _encoder_block(f"backbone.layers.{i}", block)
    return entries


def _decoder_layer(prefix, layer):
    attention = layer.self_attention
    layers = (
        attention.query_dense,
        attention.key_dense,
        attention.value_dense,
        attention.output_dense,
    )
    entries = _packed_attention(f"{prefix}.self_attn", layers, attention.num_heads)
    cross = layer.cross_attention
    for name, dense in (
        ("q", cross.query_dense),
        ("k", cross.key_dense),
        ("v", cross.value_dense),
        ("proj", cross.output_dense),
    ):
        entries += _dense(f"{prefix}.multihead_attn.{name}", dense)
    entries += _dense(f"{prefix}.linear1", layer.ffn_1)
    entries += _dense(f"{prefix}.linear2", layer.ffn_2)
    for index, norm in enumerate((layer.norm_1, layer.norm_2, layer.norm_3), start=1):
        entries += _norm(f"{prefix}.norm{index}", norm)
    return entries


def _grading_head(prefix, head):
    entries = _dense(f"{prefix}.input_proj", head.input_projection)
    entries += _norm(f"{prefix}.proj_norm", head.projection_norm)
    entries.append((f"{prefix}.q.weight", head.class_queries, None))
    entries += _dense(f"{prefix}.class_embed", head.presence)
    for i, layer in enumerate(head.decoder_layers):
        entries += _decoder_layer(f"{prefix}.decoder.layers.{i}", layer)
    return entries


def authors_weight_map(segmenter):
    """List of `(state_dict_name, keras_variable, transform_or_None)` for a segmenter."""
    entries = _backbone(segmenter.backbone)
    num_heads = len(segmenter.grading_heads)
    for j, head in enumerate(segmenter.grading_heads):
        prefix = "decode_head" if j == num_heads - 1 else f"auxiliary_head.{j}"
        entries += _grading_head(prefix, head)
    return entries


def load_authors_state_dict(segmenter, state_dict):
    """Copy an authors'-code state dict (name -> array) into `segmenter`.

    Every model variable must be found with a matching shape and every
    state-dict entry must be used (except the class token and loss buffers);
    otherwise a single ValueError lists the missing keys, the unexpected keys
    and the shape mismatches, and nothing is written.
    """
    load_weight_map(authors_weight_map(segmenter), dict(state_dict), IGNORED_KEYS)


def segmenter_from_authors_state_dict(
    state_dict,
    num_heads,
    head_num_heads,
    stage_ends=None,
    mean=None,
    std=None,
    **segmenter_kwargs,
):
    """Build a `DToPSegmenter` shaped like an authors' state dict and load it.

    Sizes (width, depth, patch, position grid, MLP width, classes, head width,
    decoder layers, number of heads) are read from the tensor shapes; the
    attention head counts are not stored in a state dict and must be given.
    `stage_ends` defaults to the authors' boundaries for the depth.
    The model gets the authors' normalisation as its preprocessor (RGB,
    ImageNet mean/std on the 0-255 scale), so `predict` takes raw RGB pixels
    as their inference does (mean/std None); other `mean`/`std` or
    `preprocessor=` (None: `predict` takes normalised images) override it.
    """
    from keras_dtop.models.backbone import DToPBackbone
    from keras_dtop.models.presets import IMAGENET_MEAN, IMAGENET_STD, mean_std_preprocessor
    from keras_dtop.models.segmenter import DToPSegmenter

    if "preprocessor" not in segmenter_kwargs:
        segmenter_kwargs["preprocessor"] = mean_std_preprocessor(
            IMAGENET_MEAN if mean is None else mean, IMAGENET_STD if std is None else std
        )

    sd = {k: _to_numpy(v) for k, v in state_dict.items()}
    patch = sd["backbone.patch_embed.projection.weight"]
    hidden_dim, num_channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[2]
    grid = int(round(np.sqrt(sd["backbone.pos_embed"].shape[1] - 1)))
    backbone = DToPBackbone(
        patch_size=patch_size,
        hidden_dim=hidden_dim,
        num_layers=count_indexed(sd, r"backbone\.layers\.(\d+)\."),
        num_heads=num_heads,
        mlp_dim=sd["backbone.layers.0.ffn.layers.0.0.weight"].shape[0],
        image_size=(grid * patch_size, grid * patch_size),
        stage_ends=stage_ends,
        num_channels=num_channels,
    )
    queries = sd["decode_head.q.weight"]
    segmenter = DToPSegmenter(
        backbone,
        num_classes=queries.shape[0],
        head_hidden_dim=queries.shape[1],
        head_num_heads=head_num_heads,
        head_num_layers=count_indexed(sd, r"decode_head\.decoder\.layers\.(\d+)\."),
        head_mlp_ratio=sd["decode_head.decoder.layers.0.linear1.weight"].shape[0] // queries.shape[1],
        **segmenter_kwargs,
    )
    load_authors_state_dict(segmenter, sd)
    return segmenter
