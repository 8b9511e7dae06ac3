"""Pruned inference that skips the work of exited tokens (design doc §7.2-7.3).

The masked reference (`DToPSegmenter.forward_stages`) keeps every token in
`(batch, tokens, dim)` tensors and only masks exited ones, so it saves nothing.
Here each stage after the first runs its blocks and its grading head on the
alive tokens only, in one of three layouts (`keras_dtop.layers.token_layout`):

- "dense": every token is alive (nothing exited yet): no gathers at all;
- "padded" `(batch, slots, dim)`: used at batch 1 and when images keep
  similar numbers of tokens;
- "packed" `(rows, dim)` for per-token layers + padded slots for attention:
  used when images keep very different numbers of tokens, so the padding of
  the "padded" layout would waste work;
- "ragged": packed rows, and attention image by image on each image's own
  rows (no padding at all); on TensorFlow and PyTorch, whose programs take
  dynamic shapes, where JAX uses "packed". Dense stages of a batch also run
  attention image by image (measured faster on CPU than one batched call).

Two ways to size the layouts:

- gathered (`pruning_mode="gathered"`, the inference default): the host reads
  the alive counts between stages and picks the layout and its capacities
  (rounded up to `token_bucket` so that jit compiles few programs). Nothing
  that the rule keeps is ever dropped. Each stage is one compiled program
  (`stage_compiler`).
- capacity (`pruning_mode="capacity"`): fixed slots per stage, no host
  decisions, so it runs inside a traced program (`jax.jit`, `tf.function`,
  export) as one static graph; eagerly it runs one program per stage. When more tokens
  are alive than a stage's capacity, the least important ones (lowest
  priority: not context, most confident) are forced to exit with the
  current head's prediction; they are counted in `forced_exits`, and eager
  calls warn.

Outputs are the same full-length `(batch, classes, tokens)` tensors as the
masked reference, so the grading rule, canvas and loss are shared.

Prefix tokens (class token, registers; P = `backbone.num_prefix_tokens`)
lead every image's sequence and are always alive: the layouts are built
from `with_prefix_alive`, so the P prefix tokens hold each image's first P
slots / rows, and the grading heads see the patch tokens only.
"""

import math
import warnings

import numpy as np
from keras import ops

from keras_dtop.layers.attention import key_bias
from keras_dtop.layers.token_layout import (
    gather_rows,
    keep_most_important,
    packed_layout,
    padded_layout,
)
from keras_dtop.models.stage_compiler import is_traced

# Pack rows when padding every image to the batch maximum would run more
# than this fraction of extra rows through the per-token layers.
PACKING_MIN_WASTE = 0.05


def _round_up(value, multiple):
    return int(math.ceil(value / multiple) * multiple)


def choose_layout(counts, num_tokens, bucket=1, ragged=False):
    """Layout and capacities for the next stage, from alive counts per image.

    counts: int array `(batch,)` of alive tokens; bucket: capacities are
    rounded up to a multiple of it (slots) or of `bucket · batch` (rows), never
    above the dense size, so that a jit compiles at most (tokens/bucket)² programs
    per stage; ragged: the backend runs dynamic shapes (TensorFlow, PyTorch),
    so attention may run image by image on the exact counts. Returns `(layout,
    sizes)`: ("dense", ()), ("padded", (slots,)), ("packed", (slots, rows)) or
    ("ragged", (slots, rows, count_0, ..., count_B-1)); "dense" sizes are the
    tokens per image (attention image by image) or () at batch 1. The capacities are
    never below the counts, so no alive token is dropped.
    """
    counts = np.asarray(counts, dtype=np.int64)
    batch, most, total = len(counts), int(counts.max()), int(counts.sum())
    if total == batch * num_tokens:
        return "dense", (num_tokens,) * batch if batch > 1 else ()
    slots = min(num_tokens, _round_up(max(most, 1), bucket))
    if batch == 1 or batch * slots <= (1 + PACKING_MIN_WASTE) * total:
        return "padded", (slots,)
    if ragged:
        return "ragged", (most, total, *(int(c) for c in counts))
    rows = min(batch * num_tokens, _round_up(max(total, 1), bucket * batch))
    return "packed", (slots, rows)


def with_prefix_alive(alive, prefix):
    """Alive mask of the whole sequence `(batch, P + tokens)`: prefix tokens always alive."""
    if not prefix:
        return alive
    batch = ops.shape(alive)[0]
    return ops.concatenate([ops.ones((batch, prefix), dtype="bool"), alive], axis=1)


def capacity_priority(scores, threshold):
    """Who stays when a stage is over capacity: context tokens (best score above
    p0) first, then the other alive tokens, least confident first.

    scores: `(batch, classes, tokens)`. Returns float32 `(batch, tokens)`.
    """
    confidence = ops.max(ops.cast(scores, "float32"), axis=1)
    return ops.where(confidence > threshold, 2.0 + confidence, 1.0 - confidence)


def _slots_to_tokens(mask_slots, token_slot, alive):
    # (batch, classes, slots) -> (batch, classes, tokens), 0 where not alive.
    classes = ops.shape(mask_slots)[1]
    per_slot = ops.reshape(ops.transpose(mask_slots, (0, 2, 1)), (-1, classes))
    per_token = ops.transpose(gather_rows(per_slot, token_slot), (0, 2, 1))
    return ops.where(alive[:, None, :], per_token, ops.zeros_like(per_token))


def compact_stage(model, static, sizes, *tensors):
    """One stage of pruned inference: blocks, grading head, exit decision.

    static: `(stage, layout, (height, width), next_capacity, grade)`; sizes:
    the layout's capacities, prefix tokens included. grade False skips the
    grading head (a stage that neither prunes nor reports). tensors:
    `(images,)` for stage 0, else `(x, alive, canvas, exit_stage)` with x
    `(batch·(P + tokens), dim)` holding every alive token's features (prefix
    tokens first in each image) at its flat index, alive `(batch, tokens)`
    for the patch tokens.
    Returns a dict: x, alive (for the next stage), exit_stage, forced_exits
    `(batch,)`, head (this head's outputs, full length), and scores
    `(batch, H, W, classes)` after the last stage.
    """
    stage, layout, (height, width), next_capacity, grade = static
    backbone = model.backbone
    last = len(model.stage_ends) - 1
    first_layer = 0 if stage == 0 else model.stage_ends[stage - 1] + 1
    blocks = backbone.encoder_blocks[first_layer : model.stage_ends[stage] + 1]
    head = model.grading_heads[stage]
    dim = backbone.hidden_dim
    prefix = backbone.num_prefix_tokens

    if stage == 0:
        x = backbone.patch_embedding(tensors[0])
        batch, tokens = ops.shape(x)[0], ops.shape(x)[1] - prefix
        alive = ops.ones((batch, tokens), dtype="bool")
        canvas, exit_stage = None, ops.full((batch, tokens), last, dtype="int32")
    else:
        x_flat, alive, canvas, exit_stage = tensors
        batch, tokens = ops.shape(alive)[0], ops.shape(alive)[1]
    sequence_alive = with_prefix_alive(alive, prefix)

    if layout == "dense":
        if stage > 0:
            x = ops.reshape(x_flat, (batch, prefix + tokens, dim))
        if sizes:  # attention image by image (sizes = tokens per image), rows packed
            x = ops.reshape(x, (1, -1, dim))
            for block in blocks:
                x = block.call_ragged(x, sizes)
            x = ops.reshape(x, (batch, prefix + tokens, dim))
        else:
            for block in blocks:
                x = block(x, training=False)
        grade_tokens = lambda: head(x[:, prefix:] if prefix else x, training=False)  # noqa: E731
        next_x = lambda: ops.reshape(x, (-1, dim))  # noqa: E731
    elif layout == "padded":
        index = padded_layout(sequence_alive, sizes[0])
        x = gather_rows(x_flat, index["slot_token"])
        for block in blocks:
            x = block(x, keep_mask=index["slot_valid"], training=False)
        slotted = x
        next_x = lambda: ops.reshape(  # noqa: E731
            gather_rows(ops.reshape(x, (-1, dim)), index["token_slot"]), (-1, dim)
        )
    elif layout in ("packed", "ragged"):
        index = packed_layout(sequence_alive, sizes[1], sizes[0])
        x = gather_rows(x_flat, index["row_token"])[None]
        bias = None if layout == "ragged" else key_bias(index["slot_valid"], x.dtype)
        for block in blocks:
            if layout == "ragged":
                x = block.call_ragged(x, sizes[2:])
            else:
                x = block.call_packed(x, index["slot_row"], index["row_slot"], bias)
        rows = x[0]
        slotted = gather_rows(rows, index["slot_row"])
        next_x = lambda: ops.reshape(gather_rows(rows, index["token_row"]), (-1, dim))  # noqa: E731
    else:
        raise ValueError(f"Unknown layout {layout!r}.")
    if layout != "dense":

        def grade_tokens():
            graded = index["slot_valid"]
            if prefix:  # the prefix tokens hold each image's first slots
                graded = graded & (ops.arange(ops.shape(graded)[1], dtype="int32") >= prefix)[None]
            presence, mask_slots = head(slotted, keep_mask=graded, training=False)
            return presence, _slots_to_tokens(mask_slots, index["token_slot"][:, prefix:], alive)

    if not grade:
        return {
            "x": next_x(),
            "alive": alive,
            "exit_stage": exit_stage,
            "forced_exits": ops.zeros((batch,), dtype="int32"),
            "head": None,
        }
    presence_logits, mask_logits = grade_tokens()
    prune = stage < last and model.prunes
    canvas, scores, exits = model.pruner(
        presence_logits, mask_logits, canvas, alive, prune=prune, stage=stage
    )
    outputs = {
        "head": {
            "presence_logits": presence_logits,
            "mask_logits": mask_logits,
            "canvas": canvas,
            "token_scores": scores,
            "alive": alive,
        },
        "forced_exits": ops.zeros((batch,), dtype="int32"),
    }
    next_alive = alive & ~exits
    if prune and next_capacity is not None:
        priority = capacity_priority(scores, model.prune_threshold)
        keep = keep_most_important(next_alive, priority, next_capacity)
        forced = next_alive & ~keep
        outputs["forced_exits"] = ops.sum(ops.cast(forced, "int32"), axis=-1)
        exits, next_alive = exits | forced, keep
    outputs["exit_stage"] = ops.where(exits, stage, exit_stage)
    if stage == last:
        outputs["scores"] = model.score_map(scores, (height, width))
    else:
        outputs["x"], outputs["alive"] = next_x(), next_alive
    return outputs


def forward_compact(model, images, return_details, mode):
    """Pruned inference, `mode` "gathered" or "capacity"; same outputs as the masked path.

    Eagerly each stage runs as one compiled program and the host picks the
    next layout; inside a TensorFlow graph the stages are inlined with
    dynamic capacities (padded layout); under a JAX trace, where the host can
    read nothing, "gathered" falls back to the masked reference.
    """
    traced = is_traced(images)
    if traced and mode == "gathered" and _is_jax():
        return model.forward_stages(images, training=False, return_details=return_details)
    run = (lambda *args: compact_stage(model, *args)) if traced else model.stage_program()
    shape = ops.shape(images)
    image_size = (shape[1], shape[2])
    num_tokens = (shape[1] // model.backbone.patch_size) * (shape[2] // model.backbone.patch_size)
    prefix = model.backbone.num_prefix_tokens
    stages = len(model.stage_ends)
    capacities = model.stage_token_capacities(num_tokens) if mode == "capacity" else None

    def static(stage, layout):
        next_capacity = capacities[stage] if capacities and stage < stages - 1 else None
        grade = stage == stages - 1 or model.prunes or bool(return_details)
        return (stage, layout, image_size, next_capacity, grade)

    batch = shape[0]
    per_image = () if traced or batch == 1 else (prefix + num_tokens,) * batch
    out = run(static(0, "dense"), per_image, images)
    steps = [out]
    for stage in range(1, stages):
        alive = out["alive"]
        if mode == "capacity":
            layout, sizes = "padded", (prefix + min(capacities[stage - 1], num_tokens),)
        elif traced and not model.prunes:
            layout, sizes = "dense", ()  # nothing exits: no gathers, static shapes
        elif traced:
            # At least one slot: a zero-length stage crashes TFLite's XNNPACK.
            most = ops.max(ops.sum(ops.cast(alive, "int32"), axis=-1))
            layout, sizes = "padded", (ops.maximum(most, 1) + prefix,)
        else:
            counts = ops.convert_to_numpy(ops.sum(ops.cast(alive, "int32"), axis=-1))
            layout, sizes = choose_layout(
                counts + prefix,
                prefix + num_tokens,
                model.resolved_token_bucket(num_tokens),
                ragged_supported(),
            )
        out = run(
            static(stage, layout),
            sizes,
            out["x"],
            alive,
            out["head"]["canvas"] if out["head"] else None,
            out["exit_stage"],
        )
        steps.append(out)

    forced = ops.stack([step["forced_exits"] for step in steps if step["head"] is not None], axis=1)
    if mode == "capacity" and not traced:
        overflow = int(ops.convert_to_numpy(ops.sum(forced)))
        if overflow:
            warnings.warn(
                f"pruning_mode='capacity': {overflow} alive tokens were forced to exit "
                f"because a stage held more than its capacity {capacities}; raise "
                "stage_capacity to keep the masked model's results.",
                stacklevel=3,
            )
    heads = [step["head"] for step in steps if step["head"] is not None]
    return model.assemble_outputs(
        out["scores"], heads, out["exit_stage"], image_size, return_details, forced
    )


def ragged_supported():
    """Whether stage programs take per-image sizes as dynamic values (not JAX)."""
    return not _is_jax()


def _is_jax():
    import keras

    return keras.backend.backend() == "jax"
