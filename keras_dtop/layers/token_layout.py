"""Index maps that move alive tokens between the full grid and compact layouts.

Pruned inference runs a stage's blocks on the alive tokens only, in compact
layouts (design doc §7.2-7.3; `keras_dtop.models.stage_runner` picks one):

- padded `(batch, slots, dim)`: the alive tokens of each image, in token
  order, then padding slots (masked out of attention). Used by attention and
  the grading heads, and by the whole stage when images prune alike.
- packed `(rows, dim)`: the alive tokens of the whole batch back to back, in
  flat `(image, token)` order, then padding rows. Per-token layers (norms,
  projections, MLP) run here, so an image with few alive tokens costs little
  even when another image in the batch keeps all of them. Attention then runs
  on padded slots ("packed") or image by image on each image's rows ("ragged").

Everything is static-shape given the capacities `slots` and `rows` (Python
ints, or scalar tensors on TensorFlow graphs); no boolean indexing, no
`nonzero`. Capacities below the alive counts would drop tokens: callers pick
them from the counts (gathered mode) or shrink `alive` first (capacity mode).
"""

from keras import ops

from keras_dtop.layers.pruning import top_k_mask


def gather_rows(x, index):
    """Row gather `x[index]`: x `(rows, dim...)`, int index of any shape."""
    return ops.take(x, index, axis=0)


def _alive_first_key(alive):
    # top_k of this key lists alive tokens first, each group in index order.
    index = ops.arange(ops.shape(alive)[-1], dtype="int32")
    size = ops.cast(ops.size(alive), "int32")
    return -ops.cast(ops.where(alive, index, index + size), "float32")


def padded_layout(alive, slots):
    """Where every image's alive tokens sit in a `(batch, slots)` layout.

    alive: bool `(batch, tokens)`, at most `slots` True per image.
    Returns a dict of int32 index maps:
        slot_token `(batch, slots)`: flat token index `b·N + t` of each slot
            (padding slots repeat a dead or alive token; their values are never read);
        slot_valid bool `(batch, slots)`;
        token_slot `(batch, tokens)`: flat slot `b·slots + s` of each alive
            token (0 for the others: gather, then mask with `alive`).
    """
    alive = ops.cast(alive, "bool")
    shape = ops.shape(alive)
    batch, tokens = shape[0], shape[1]
    counts = ops.sum(ops.cast(alive, "int32"), axis=-1)
    _, slot_token = ops.top_k(_alive_first_key(alive), slots)
    slot_token = ops.cast(slot_token, "int32")
    image = ops.arange(batch, dtype="int32")[:, None]
    slot_valid = ops.arange(slots, dtype="int32")[None, :] < counts[:, None]
    rank = ops.cumsum(ops.cast(alive, "int32"), axis=-1) - 1
    token_slot = ops.where(alive, image * slots + rank, 0)
    return {
        "slot_token": slot_token + image * tokens,
        "slot_valid": slot_valid,
        "token_slot": token_slot,
    }


def packed_layout(alive, rows, slots):
    """Packed rows for per-token layers plus the padded slots attention needs.

    alive: bool `(batch, tokens)`; rows >= total alive, slots >= max alive per image.
    Returns the `padded_layout` maps plus:
        row_token `(rows,)`: flat token index of each packed row (alive tokens in
            flat order, then padding rows);
        slot_row `(batch, slots)`: packed row of each slot (0 for padding slots);
        row_slot `(rows,)`: flat slot of each packed row (0 for padding rows);
        token_row `(batch, tokens)`: packed row of each alive token (0 otherwise).
    """
    alive = ops.cast(alive, "bool")
    shape = ops.shape(alive)
    tokens = shape[1]
    layout = padded_layout(alive, slots)
    alive_int = ops.cast(alive, "int32")
    counts = ops.sum(alive_int, axis=-1)
    offsets = ops.cumsum(counts) - counts  # first packed row of every image
    flat_alive = ops.reshape(alive, (-1,))
    total = ops.sum(counts)
    _, row_token = ops.top_k(_alive_first_key(flat_alive), rows)
    row_token = ops.cast(row_token, "int32")
    row_valid = ops.arange(rows, dtype="int32") < total
    row_image = row_token // tokens
    row_rank = ops.arange(rows, dtype="int32") - ops.take(offsets, row_image, axis=0)
    slot = ops.arange(slots, dtype="int32")[None, :]
    rank = ops.cumsum(alive_int, axis=-1) - 1
    layout.update(
        row_token=row_token,
        slot_row=ops.where(layout["slot_valid"], offsets[:, None] + slot, 0),
        row_slot=ops.where(row_valid, row_image * slots + row_rank, 0),
        token_row=ops.where(alive, offsets[:, None] + rank, 0),
    )
    return layout


def keep_most_important(alive, priority, capacity):
    """Keep at most `capacity` alive tokens per image, highest `priority` first.

    Ties go to the lower token index. alive: bool `(batch, tokens)`;
    priority: `(batch, tokens)`; capacity: Python int >= 1.
    Returns bool `(batch, tokens)`, a subset of `alive`.
    """
    tokens = ops.shape(alive)[-1]
    capacity = min(int(capacity), int(tokens))
    return top_k_mask(priority, capacity, alive)
