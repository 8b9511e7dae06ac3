"""Copy PyTorch-layout state dicts into Keras variables through a weight map.

A weight map is a list of `(names, variable, transform)`: `names` is one
state-dict key (or a tuple of keys whose arrays `transform` combines),
`variable` the Keras variable it fills and `transform` turns the arrays into
the variable's layout (None: as stored). The helpers below build the entries
of common torch modules: `Linear` weights are `(out, in)`, convolutions
`(out, in, kh, kw)`, attention projections are split into heads.
`load_weight_map` checks everything before writing anything.
"""

import re

import numpy as np


def to_numpy(value):
    """A torch tensor, NumPy array or Keras variable -> NumPy array."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # no NumPy bfloat16
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def count_indexed(state_dict, pattern):
    """Number of numbered modules: 1 + the largest group-1 index of `pattern` over the keys (0 if none)."""
    indices = {int(m.group(1)) for k in state_dict if (m := re.match(pattern, k))}
    return max(indices) + 1 if indices else 0


def zero_missing_biases(state_dict, weight_pattern):
    """A copy of `state_dict` with a zero `.bias` beside every `weight_pattern` key that has none.

    Bias-free projections (e.g. `qkv_bias=False`) are the same model as
    projections with zero biases, which is what the encoder block has.
    """
    state_dict = dict(state_dict)
    for key in [k for k in state_dict if re.match(weight_pattern, k)]:
        bias = key[: -len("weight")] + "bias"
        state_dict.setdefault(bias, np.zeros(state_dict[key].shape[0], "float32"))
    return state_dict


def linear(weight):
    """torch `Linear` `(out, in)` -> Keras `Dense` `(in, out)`."""
    return np.transpose(weight)


def conv(weight):
    """torch `Conv2d` `(out, in, kh, kw)` -> Keras `Conv2D` `(kh, kw, in, out)`."""
    return np.transpose(weight, (2, 3, 1, 0))


def heads_in(weight, num_heads):
    """torch `(out, in)` projection -> Keras `(in, heads, head_dim)`."""
    out_dim, in_dim = weight.shape
    return np.transpose(weight).reshape(in_dim, num_heads, out_dim // num_heads)


def heads_out(weight, num_heads):
    """torch `(out, in)` output projection -> Keras `(heads, head_dim, out)`."""
    out_dim, in_dim = weight.shape
    return np.transpose(weight).reshape(num_heads, in_dim // num_heads, out_dim)


def norm_entries(prefix, layer):
    return [(f"{prefix}.weight", layer.gamma, None), (f"{prefix}.bias", layer.beta, None)]


def dense_entries(prefix, layer):
    return [(f"{prefix}.weight", layer.kernel, linear), (f"{prefix}.bias", layer.bias, None)]


def packed_attention_entries(weight_key, bias_key, layers, num_heads):
    """q, k, v stacked in one `(3·D, D)` projection (`nn.MultiheadAttention`'s
    `in_proj_weight`, timm's `qkv`) -> query/key/value `EinsumDense` layers."""
    entries = []
    for index, layer in enumerate(layers):

        def weight(w, index=index):
            return heads_in(np.split(w, 3, axis=0)[index], num_heads)

        def bias(b, index=index, shape=tuple(layer.bias.shape)):
            return np.split(b, 3, axis=0)[index].reshape(shape)

        entries.append((weight_key, layer.kernel, weight))
        entries.append((bias_key, layer.bias, bias))
    return entries


def block_attention_entries(names, block):
    """Separate q, k, v, output `Linear`s (`names`: their four prefixes) -> an encoder block."""
    layers = (block.query_dense, block.key_dense, block.value_dense)
    entries = []
    for name, layer in zip(names[:3], layers):
        entries.append((f"{name}.weight", layer.kernel, lambda w: heads_in(w, block.num_heads)))
        entries.append(
            (f"{name}.bias", layer.bias, lambda b, s=tuple(layer.bias.shape): b.reshape(s))
        )
    entries.append(
        (f"{names[3]}.weight", block.output_dense.kernel, lambda w: heads_out(w, block.num_heads))
    )
    entries.append((f"{names[3]}.bias", block.output_dense.bias, None))
    return entries


def _keys(names):
    return (names,) if isinstance(names, str) else tuple(names)


def load_weight_map(entries, state_dict, ignored=(), what="State dict"):
    """Assign every entry of a weight map from `state_dict` (name -> array).

    Every variable must be found with a matching shape and every state-dict
    key must be used or match one of the `ignored` regular expressions;
    otherwise one ValueError lists the missing keys, the unexpected keys and
    the shape mismatches, and nothing is written.
    """
    used = {key for names, _, _ in entries for key in _keys(names)}
    missing = sorted(key for key in used if key not in state_dict)
    unexpected = sorted(
        key for key in state_dict if key not in used and not any(p.match(key) for p in ignored)
    )
    mismatched, values = [], []
    for names, variable, transform in entries:
        keys = _keys(names)
        if any(key not in state_dict for key in keys):
            continue
        arrays = [to_numpy(state_dict[key]) for key in keys]
        try:
            value = arrays[0] if transform is None else transform(*arrays)
        except ValueError:
            value = None
        target = tuple(variable.shape)
        if value is None or tuple(value.shape) != target:
            got = ", ".join(str(tuple(a.shape)) for a in arrays)
            mismatched.append(
                f"{' + '.join(keys)}: checkpoint {got} does not fit {variable.path} {target}"
            )
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
        raise ValueError(f"{what} does not match the model.\n" + "\n".join(problems))
    for variable, value in values:
        variable.assign(value.astype(variable.dtype))
