"""Load state dicts of the authors' mmsegmentation DToP code into `DToPSegmenter`.

Names and layouts are listed in `shared/fixtures/authors-dtop/README.md`:
torch `Linear` weights are `(out, in)`, convolutions `(out, in, kh, kw)`,
`nn.MultiheadAttention` packs q, k, v in `in_proj_weight`. Each small function
below maps one module; `load_authors_state_dict` checks that every variable
is written once and every state-dict entry is used.
"""

import re

import numpy as np

# Entries that exist in the authors' state dicts but carry no inference weights.
IGNORED_KEYS = (
    re.compile(r"^backbone\.cls_token$"),
    re.compile(r".*\.loss_decode\..*"),
)


def _linear(weight):
    return np.transpose(weight)


def _heads_in(weight, num_heads):
    """torch `(out, in)` projection -> keras `(in, heads, head_dim)`."""
    out_dim, in_dim = weight.shape
    return np.transpose(weight).reshape(in_dim, num_heads, out_dim // num_heads)


def _heads_out(weight, num_heads):
    """torch `(out, in)` output projection -> keras `(heads, head_dim, out)`."""
    out_dim, in_dim = weight.shape
    return np.transpose(weight).reshape(num_heads, in_dim // num_heads, out_dim)


def _norm(prefix, layer):
    return [(f"{prefix}.weight", layer.gamma, None), (f"{prefix}.bias", layer.beta, None)]


def _dense(prefix, layer):
    return [(f"{prefix}.weight", layer.kernel, _linear), (f"{prefix}.bias", layer.bias, None)]


def _packed_attention(prefix, layers, num_heads):
    """torch `nn.MultiheadAttention` (q, k, v stacked in `in_proj_*`, then
    `out_proj`) -> query/key/value/output `EinsumDense` layers, keras MHA layout."""
    query, key, value, output = layers
    entries = []
    for index, layer in enumerate((query, key, value)):

        def weight(w, index=index):
            return _heads_in(np.split(w, 3, axis=0)[index], num_heads)

        def bias(b, index=index):
            return np.split(b, 3, axis=0)[index].reshape(tuple(layer.bias.shape))

        entries.append((f"{prefix}.in_proj_weight", layer.kernel, weight))
        entries.append((f"{prefix}.in_proj_bias", layer.bias, bias))
    entries.append(
        (f"{prefix}.out_proj.weight", output.kernel, lambda w: _heads_out(w, num_heads))
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
            lambda w: np.transpose(w, (2, 3, 1, 0)),
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


def _to_numpy(value):
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def load_authors_state_dict(segmenter, state_dict):
    """Copy an authors'-code state dict (name -> array) into `segmenter`.

    Every model variable must be found with a matching shape and every
    state-dict entry must be used (except the class token and loss buffers);
    otherwise a single ValueError lists the missing keys, the unexpected keys
    and the shape mismatches, and nothing is written.
    """
    state_dict = {k: v for k, v in state_dict.items()}
    entries = authors_weight_map(segmenter)
    used = {name for name, _, _ in entries}
    missing = sorted(name for name in used if name not in state_dict)
    unexpected = sorted(
        name
        for name in state_dict
        if name not in used and not any(p.match(name) for p in IGNORED_KEYS)
    )
    mismatched, values = [], []
    for name, variable, transform in entries:
        if name not in state_dict:
            continue
        value = _to_numpy(state_dict[name])
        try:
            value = value if transform is None else transform(value)
        except ValueError:
            value = None
        target = tuple(variable.shape)
        if value is None or tuple(value.shape) != target:
            got = tuple(_to_numpy(state_dict[name]).shape)
            mismatched.append(f"{name}: checkpoint {got} does not fit {variable.path} {target}")
            continue
        values.append((variable, value))
    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(dict.fromkeys(mismatched)))
    if problems:
        raise ValueError("State dict does not match the model.\n" + "\n".join(problems))
    for variable, value in values:
        variable.assign(value.astype(variable.dtype))


def _count(state_dict, pattern):
    indices = {int(m.group(1)) for k in state_dict if (m := re.match(pattern, k))}
    return max(indices) + 1 if indices else 0


def segmenter_from_authors_state_dict(
    state_dict, num_heads, head_num_heads, stage_ends=None, **segmenter_kwargs
):
    """Build a `DToPSegmenter` shaped like an authors' state dict and load it.

    Sizes (width, depth, patch, position grid, MLP width, classes, head width,
    decoder layers, number of heads) are read from the tensor shapes; the
    attention head counts are not stored in a state dict and must be given.
    `stage_ends` defaults to the authors' boundaries for the depth.
    """
    from keras_dtop.models.backbone import DToPBackbone
    from keras_dtop.models.segmenter import DToPSegmenter

    sd = {k: _to_numpy(v) for k, v in state_dict.items()}
    patch = sd["backbone.patch_embed.projection.weight"]
    hidden_dim, num_channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[2]
    grid = int(round(np.sqrt(sd["backbone.pos_embed"].shape[1] - 1)))
    backbone = DToPBackbone(
        patch_size=patch_size,
        hidden_dim=hidden_dim,
        num_layers=_count(sd, r"backbone\.layers\.(\d+)\."),
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
        head_num_layers=_count(sd, r"decode_head\.decoder\.layers\.(\d+)\."),
        head_mlp_ratio=sd["decode_head.decoder.layers.0.linear1.weight"].shape[0] // queries.shape[1],
        **segmenter_kwargs,
    )
    load_authors_state_dict(segmenter, sd)
    return segmenter
