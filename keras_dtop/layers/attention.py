"""Attention helpers shared by the encoder block and the grading head.

Pruned tokens are removed as attention keys with an additive bias instead of a
boolean mask: it works the same on every backend, inside `jit`, and in a
TFLite graph (no select/where over the attention matrix).
"""

import keras
from keras import ops


def mask_value(dtype):
    """A large negative number that still fits `dtype` (float16 overflows at 65504)."""
    return -3.0e4 if keras.backend.standardize_dtype(dtype) == "float16" else -1.0e9


def key_bias(keep_mask, dtype):
    """Additive key bias `(batch, 1, 1, tokens)` from a keep mask `(batch, tokens)`.

    0 where a token is kept, a large negative number where it was pruned.
    """
    bias = ops.where(keep_mask, 0.0, mask_value(dtype))
    return ops.cast(bias, dtype)[:, None, None, :]


def attention_logits(query, key, scale):
    """Scaled dot products `(batch, heads, queries, keys)`.

    query: `(batch, queries, heads, head_dim)`; key: `(batch, keys, heads, head_dim)`.
    """
    return ops.einsum("bqhd,bkhd->bhqk", query, key) * ops.cast(scale, query.dtype)


def attend(logits, value, bias=None, dropout=None, training=None):
    """Softmax over keys (after adding `bias`), optional dropout, weighted sum of values.

    logits: `(batch, heads, queries, keys)`; value: `(batch, keys, heads, head_dim)`.
    Returns `(batch, queries, heads, head_dim)`.
    """
    if logits.shape[-1] == 1:
        # One key (a stage left with a single token): the softmax is exactly 1.
        weights = ops.ones_like(logits)
    else:
        if bias is not None:
            logits = logits + bias
        weights = ops.softmax(logits, axis=-1)
    if dropout is not None:
        weights = dropout(weights, training=training)
    return ops.einsum("bhqk,bkhd->bqhd", weights, value)
