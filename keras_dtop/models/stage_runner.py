"""The stage engine: DToP's forward pass, one stage loop for training and inference.

A `StageRunner` owns how a `DToPSegmenter` runs (design doc §3, §7):

    images ──patch embedding──▶ x (batch, P + tokens, dim), alive (batch, tokens) = True
    for each stage j:
        layout_j  = _layout(...)        masked | dense | padded | packed | ragged
        x         = the blocks of stage j on the alive tokens, in layout_j
        head j grades the alive tokens; the rule (`TokenPruner`) picks the exits;
        the canvas keeps the exited tokens' mask logits
    scores = the final head's token scores, upsampled to pixels

Layouts (`keras_dtop.layers.token_layout` has the index maps):
- "masked": static `(batch, P + tokens, dim)`, exited tokens masked out of
  attention and zeroed: the training path and the reference; saves nothing.
- "dense": every token alive (the first stage, or pruning off): no gathers.
- "padded" `(batch, slots, dim)`: each image's alive tokens, then padding.
- "packed" / "ragged": the batch's alive tokens back to back for the
  per-token layers; attention on padded slots ("packed") or image by image on
  each image's own rows ("ragged", where programs take dynamic shapes).

Execution modes (`pruning_mode`): "gathered" reads the alive counts on the
host between stages and runs each stage as one compiled program on exactly
the tokens it needs; "capacity" uses fixed per-stage slots (static shapes,
one program for the whole pass); "masked" is the reference. When nothing can
exit (pruning off) the whole pass is one program too, so the dense model
never pays for being run stage by stage.

Two values decide what runs, so nothing depends on mutable caches:
- `ExecutionPlan`: derived from the model's public settings (p0, k, mode,
  capacities, pruner) at every call; compiled programs are cached by plan,
  so a change made anywhere takes effect on the next call.
- `ExecutionPolicy`: what the device does well (dynamic shapes; per-image
  vs batched attention, measured once per shape by default).
"""

import dataclasses
import math
import time
import warnings

import keras
import numpy as np
from keras import ops

from keras_dtop.layers.attention import key_bias
from keras_dtop.layers.token_layout import (
    gather_rows,
    keep_most_important,
    packed_layout,
    padded_layout,
)
from keras_dtop.models.stage_compiler import compile_stage_function, is_traced

# Pack rows when padding every image to the batch maximum would run more
# than this fraction of extra rows through the per-token layers.
PACKING_MIN_WASTE = 0.05

# Per-image vs batched attention, measured once per (backend, shape) in a process.
_ATTENTION_CHOICES = {}


@dataclasses.dataclass(frozen=True)
class ExecutionPolicy:
    """How this backend and device run compact stages (a value, not model state).

    dynamic_shapes: stage programs take capacities as run-time values
        (TensorFlow graphs, PyTorch eager), so the "ragged" layout and exact
        capacities cost no recompiles; False on JAX (one program per shape).
    compiles: stage programs are compiled (TensorFlow, JAX); PyTorch runs eagerly.
    per_image_attention: True / False, or "auto": time one block both ways
        the first time a (batch, tokens) shape is seen, keep the faster. Used
        by dense stages of a batch and for "ragged" vs "packed".
    token_bucket: "gathered" capacities are rounded up to a multiple of it;
        None: 1 with dynamic shapes, tokens/16 otherwise (few jit programs).
    """

    dynamic_shapes: bool = True
    compiles: bool = True
    per_image_attention: object = "auto"
    token_bucket: object = None

    @classmethod
    def for_backend(cls, backend=None, **overrides):
        backend = backend or keras.backend.backend()
        values = dict(dynamic_shapes=backend != "jax", compiles=backend != "torch")
        values.update(overrides)
        return cls(**values)

    def bucket(self, num_tokens):
        if self.token_bucket is not None:
            return int(self.token_bucket)
        return 1 if self.dynamic_shapes else max(1, num_tokens // 16)


@dataclasses.dataclass(frozen=True)
class ExecutionPlan:
    """What one forward pass runs; hashable, it keys the compiled programs.

    mode: "masked", "gathered" or "capacity"; prunes: the auxiliary heads make
    exit decisions; grade_all: every head runs (training, or details asked);
    host_decisions: layouts are picked on the host between stages.
    """

    mode: str
    training: bool
    prunes: bool
    grade_all: bool
    host_decisions: bool
    pruner: tuple  # (id, p0, k): what the rule decides with
    stage_capacity: object
    token_bucket: object
    policy: ExecutionPolicy


def choose_layout(counts, num_tokens, bucket=1, ragged=False):
    """Layout and capacities for the next stage, from alive counts per image.

    counts: int array `(batch,)` of alive tokens; bucket: capacities are
    rounded up to a multiple of it (slots) or of `bucket · batch` (rows), never
    above the dense size, so that a jit compiles at most (tokens/bucket)² programs
    per stage; ragged: attention may run image by image on the exact counts
    (dynamic shapes, and per-image attention measured faster). Returns
    `(layout, sizes)`: ("dense", ()), ("padded", (slots,)), ("packed", (slots,
    rows)) or ("ragged", (slots, rows, count_0, ..., count_B-1)). The
    capacities are never below the counts, so no alive token is dropped.
    """
    counts = np.asarray(counts, dtype=np.int64)
    batch, most, total = len(counts), int(counts.max()), int(counts.sum())
    if total == batch * num_tokens:
        return "dense", ()
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


def check_thresholds_per_head(prune_threshold, num_pruning_heads):
    """A per-stage p0 must hold exactly one value per pruning head (a float always fits)."""
    if isinstance(prune_threshold, tuple) and len(prune_threshold) != num_pruning_heads:
        raise ValueError(
            f"prune_threshold has {len(prune_threshold)} values, but the model has "
            f"{num_pruning_heads} pruning heads (every stage but the last): give one p0 per "
            f"pruning head, or one float for all, got {prune_threshold}."
        )
    return prune_threshold


def score_map(token_scores, image_size, patch_size):
    """`(batch, classes, tokens)` -> bilinear `(batch, H, W, classes)` scores."""
    height, width = image_size
    batch, classes = ops.shape(token_scores)[0], ops.shape(token_scores)[1]
    token_map = ops.transpose(token_scores, (0, 2, 1))
    token_map = ops.reshape(token_map, (batch, height // patch_size, width // patch_size, classes))
    return ops.image.resize(token_map, (height, width), interpolation="bilinear", antialias=False)


class StageRunner:
    """Runs a `DToPSegmenter`'s stages: layouts, programs, the stage loop.

    The model keeps the layers and the settings; this object decides how they
    run and caches the compiled programs (keyed by `ExecutionPlan`).
    `trace_count` counts program traces (TensorFlow, JAX): a repeated call
    with the same shapes and settings must not add any.
    """

    def __init__(self, model, policy=None):
        self.model = model
        self.policy = policy or ExecutionPolicy.for_backend()
        self.trace_count = 0
        self._programs = {}

    # --- Plans ---

    def plan(self, training=False, details=False, traced=False):
        """The `ExecutionPlan` of a call, from the model's settings now."""
        model = self.model
        pruner = model.pruner
        check_thresholds_per_head(pruner.prune_threshold, len(model.stage_ends) - 1)
        prunes = (
            model.pruning_enabled and pruner.lowest_threshold < 1.0 and len(model.stage_ends) > 1
        )
        mode = model.pruning_mode
        if training or mode == "masked":
            mode = "masked"
        elif mode == "capacity" and prunes:
            mode = "capacity"
        elif traced and prunes and not self.policy.dynamic_shapes:
            mode = "masked"  # a JAX trace cannot read counts: same results, no saving
        else:
            mode = "gathered"
        return ExecutionPlan(
            mode=mode,
            training=bool(training),
            prunes=prunes,
            grade_all=bool(training or details),
            host_decisions=mode == "gathered" and prunes and not traced,
            pruner=(id(pruner), pruner.prune_threshold, pruner.keep_top_k),
            stage_capacity=model.stage_capacity,
            token_bucket=model.token_bucket,
            policy=self.policy,
        )

    def stage_token_capacities(self, num_tokens):
        """Capacity mode: slots of every stage after the first, as ints in [1, tokens]."""
        model = self.model
        if model.stage_capacity is None:
            raise ValueError(
                "pruning_mode='capacity' needs stage_capacity: one int (tokens) or float "
                f"(fraction of tokens) per pruning head ({len(model.stage_ends) - 1})."
            )
        return [
            min(num_tokens, max(1, math.ceil(c * num_tokens) if isinstance(c, float) else c))
            for c in model.stage_capacity
        ]

    # --- The forward pass ---

    def forward(self, images, training=False, details=False):
        """Outputs of one pass: the dict `DToPSegmenter.call(return_details=True)` documents."""
        traced = is_traced(images)
        plan = self.plan(training, details, traced)
        if plan.mode == "capacity":
            self.stage_token_capacities(1)  # a clear error before anything is traced
        if traced or training:
            return self._walk(images, plan, self._run_stage)
        self._measure_attention(images)
        if not self.policy.compiles:
            outputs = self._walk(images, plan, self._run_stage)
        elif plan.host_decisions:
            outputs = self._walk(images, plan, self._stage_program)
        else:  # every layout is known in advance: the whole pass is one program
            program = self._program(
                ("pass", plan), lambda static, sizes, x: self._walk(x, plan, self._run_stage)
            )
            outputs = program(("pass", plan), (), images)
        if plan.mode == "capacity":
            self._warn_overflow(outputs["forced_exits"], images)
        return outputs

    def _walk(self, images, plan, run_stage):
        """The stage loop. `run_stage(static, sizes, *state)` runs one stage."""
        model = self.model
        shape = ops.shape(images)
        image_size = (shape[1], shape[2])
        patch = model.backbone.patch_size
        num_tokens = (shape[1] // patch) * (shape[2] // patch)
        stages = len(model.stage_ends)
        out, steps = None, []
        for stage in range(stages):
            grade = stage == stages - 1 or plan.prunes or plan.grade_all
            layout, sizes = self._layout(stage, out, plan, shape[0], num_tokens)
            static = (stage, layout, image_size, grade, plan)
            state = (images,) if stage == 0 else (
                out["x"], out["alive"], out["head"]["canvas"] if out["head"] else None,
                out["exit_stage"],
            )
            out = run_stage(static, sizes, *state)
            steps.append(out)
        heads = [step["head"] for step in steps if step["head"] is not None]
        forced = ops.stack([step["forced_exits"] for step in steps if step["head"] is not None], axis=1)
        scores = score_map(heads[-1]["token_scores"], image_size, patch)
        outputs = {"scores": scores, "token_scores": heads[-1]["token_scores"]}
        if plan.grade_all:
            outputs["heads"] = heads
            outputs["exit_stage"] = ops.reshape(
                out["exit_stage"], (-1, image_size[0] // patch, image_size[1] // patch)
            )
            outputs["alive_counts"] = ops.stack(
                [ops.sum(ops.cast(h["alive"], "int32"), axis=-1) for h in heads], axis=1
            )
        if plan.grade_all or plan.mode == "capacity":
            outputs["forced_exits"] = forced
        return outputs

    def _layout(self, stage, previous, plan, batch, num_tokens):
        """Layout and capacities (prefix tokens included) of `stage`."""
        prefix = self.model.backbone.num_prefix_tokens
        if plan.mode == "masked":
            return "masked", ()
        if stage == 0 or not plan.prunes:
            return "dense", self._dense_sizes(batch, prefix + num_tokens)
        if plan.mode == "capacity":
            return "padded", (prefix + self.stage_token_capacities(num_tokens)[stage - 1],)
        counts = ops.sum(ops.cast(previous["alive"], "int32"), axis=-1)
        if not plan.host_decisions:  # a TensorFlow graph: dynamic capacity, padded
            # At least one slot: a zero-length stage crashes TFLite's XNNPACK.
            return "padded", (ops.maximum(ops.max(counts), 1) + prefix,)
        counts = ops.convert_to_numpy(counts)
        ragged = self.policy.dynamic_shapes and self._per_image_attention(batch, prefix + num_tokens)
        bucket = plan.token_bucket or self.policy.bucket(num_tokens)
        layout, sizes = choose_layout(counts + prefix, prefix + num_tokens, bucket, ragged)
        if layout == "dense":  # nothing exited this time
            sizes = self._dense_sizes(batch, prefix + num_tokens)
        return layout, sizes

    def _dense_sizes(self, batch, seq_len):
        # Tokens per image when attention runs image by image, else ().
        if isinstance(batch, int) and batch > 1 and self._per_image_attention(batch, seq_len):
            return (seq_len,) * batch
        return ()

    def _run_stage(self, static, sizes, *state):
        """One stage: its blocks in a layout, its grading head, the exit rule.

        static: `(stage, layout, (height, width), grade, plan)`; sizes: the
        layout's capacities. state: `(images,)` for stage 0, else `(x, alive,
        canvas, exit_stage)` with x `(batch, P + tokens, dim)` (zeros at
        exited tokens), alive `(batch, tokens)` for the patch tokens.
        Returns a dict: x, alive and exit_stage for the next stage,
        forced_exits `(batch,)`, head (this head's full-length outputs, or
        None when it did not run).
        """
        stage, layout, _, grade, plan = static
        model = self.model
        backbone = model.backbone
        last = len(model.stage_ends) - 1
        first_layer = 0 if stage == 0 else model.stage_ends[stage - 1] + 1
        blocks = backbone.encoder_blocks[first_layer : model.stage_ends[stage] + 1]
        prefix = backbone.num_prefix_tokens
        if stage == 0:
            x = backbone.patch_embedding(state[0])
            batch, tokens = ops.shape(x)[0], ops.shape(x)[1] - prefix
            alive = ops.ones((batch, tokens), dtype="bool")
            canvas, exit_stage = None, ops.full((batch, tokens), last, dtype="int32")
        else:
            x, alive, canvas, exit_stage = state
            batch = ops.shape(alive)[0]
        x, grade_tokens = run_blocks(
            blocks, model.grading_heads[stage], layout, sizes, x, alive, prefix,
            keep_mask=stage > 0 and plan.prunes, training=plan.training,
        )
        no_exits = ops.zeros((batch,), dtype="int32")
        if not grade:
            return {"x": x, "alive": alive, "exit_stage": exit_stage, "forced_exits": no_exits, "head": None}
        presence_logits, mask_logits = grade_tokens()
        prune = stage < last and plan.prunes
        canvas, scores, exits = model.pruner(
            presence_logits, mask_logits, canvas, alive, prune=prune, stage=stage
        )
        next_alive, forced = alive & ~exits, no_exits
        if prune and plan.mode == "capacity":
            num_tokens = ops.shape(alive)[1]
            capacity = self.stage_token_capacities(num_tokens)[stage]
            keep = keep_most_important(next_alive, capacity_priority(scores, model.pruner.threshold_at(stage)), capacity)
            forced = ops.sum(ops.cast(next_alive & ~keep, "int32"), axis=-1)
            exits, next_alive = exits | (next_alive & ~keep), keep
        head = {
            "presence_logits": presence_logits,
            "mask_logits": mask_logits,
            "canvas": canvas,
            "token_scores": scores,
            "alive": alive,
        }
        return {
            "x": x,
            "alive": next_alive,
            "exit_stage": ops.where(exits, stage, exit_stage),
            "forced_exits": forced,
            "head": head,
        }

    # --- Compiled programs ---

    def _program(self, key, fn):
        """The compiled program for `key` (built, and traced, once)."""
        if key not in self._programs:

            def counted(*args):
                self.trace_count += 1  # runs only while a program is traced
                return fn(*args)

            self._programs[key] = compile_stage_function(counted, self.model)
        return self._programs[key]

    def _stage_program(self, static, sizes, *state):
        key = ("stage",) + static
        return self._program(key, self._run_stage)(static, sizes, *state)

    def clear_programs(self):
        """Drop every compiled program (they rebuild on the next call)."""
        self._programs = {}

    # --- Measured choices ---

    def _measure_attention(self, images):
        # Eagerly, before any program is built: decide per-image attention
        # for this batch so that every layout below can read it.
        batch = ops.shape(images)[0]
        if isinstance(batch, int) and batch > 1:
            patch = self.model.backbone.patch_size
            seq = ops.shape(images)[1] // patch * (ops.shape(images)[2] // patch)
            self._per_image_attention(batch, seq + self.model.backbone.num_prefix_tokens, measure=True)

    def _per_image_attention(self, batch, seq_len, measure=False):
        choice = self.policy.per_image_attention
        if choice != "auto":
            return bool(choice)
        block = self.model.backbone.encoder_blocks[0]
        key = (
            keras.backend.backend(), batch, seq_len, block.hidden_dim, block.num_heads,
            block.mlp_dim, block.compute_dtype,
        )
        if key not in _ATTENTION_CHOICES:
            if not measure:
                return False  # inside a trace: batched attention
            _ATTENTION_CHOICES[key] = self._time_attention(block, batch, seq_len)
        return _ATTENTION_CHOICES[key]

    def _time_attention(self, block, batch, seq_len, repeats=2):
        """Whether one block runs faster with attention image by image."""
        dim = block.hidden_dim
        x = ops.convert_to_tensor(
            np.random.default_rng(0).normal(size=(batch, seq_len, dim)).astype(block.compute_dtype)
        )

        def batched(static, sizes, x):
            return block(x, training=False)

        def per_image(static, sizes, x):
            rows = block.call_ragged(ops.reshape(x, (1, -1, dim)), (seq_len,) * batch)
            return ops.reshape(rows, (batch, seq_len, dim))

        best = {}
        for name, fn in (("batched", batched), ("per_image", per_image)):
            program = compile_stage_function(fn, self.model)
            times = []
            for _ in range(repeats + 1):  # the first run compiles
                start = time.perf_counter()
                ops.convert_to_numpy(program(("probe", name), (), x))
                times.append(time.perf_counter() - start)
            best[name] = min(times[1:])
        return best["per_image"] < best["batched"]

    def _warn_overflow(self, forced, images):
        overflow = int(ops.convert_to_numpy(ops.sum(forced)))
        if overflow:
            patch = self.model.backbone.patch_size
            num_tokens = (ops.shape(images)[1] // patch) * (ops.shape(images)[2] // patch)
            warnings.warn(
                f"pruning_mode='capacity': {overflow} alive tokens were forced to exit "
                "because a stage held more than its capacity "
                f"{self.stage_token_capacities(num_tokens)}; raise stage_capacity to keep "
                "the masked model's results.",
                stacklevel=4,
            )


def run_blocks(blocks, head, layout, sizes, x, alive, prefix, keep_mask, training):
    """A stage's blocks on `x` `(batch, P + tokens, dim)` in `layout`.

    Returns `(x, grade)`: x back on the full grid (only alive tokens' rows are
    meaningful), and `grade()` -> (presence_logits, mask_logits `(batch,
    classes, tokens)`, 0 where not alive) from the grading head on the
    stage's alive patch tokens.
    """
    shape = ops.shape(x)
    batch, seq, dim = shape[0], shape[1], shape[2]
    sequence_alive = with_prefix_alive(alive, prefix)
    if layout == "masked":
        mask = sequence_alive if keep_mask else None
        for block in blocks:
            x = block(x, keep_mask=mask, training=training)
        head_mask = alive if keep_mask else None
        return x, lambda: head(x[:, prefix:] if prefix else x, keep_mask=head_mask, training=training)
    if layout == "dense":
        if sizes:  # attention image by image (sizes = tokens per image), rows packed
            rows = ops.reshape(x, (1, -1, dim))
            for block in blocks:
                rows = block.call_ragged(rows, sizes)
            x = ops.reshape(rows, (batch, seq, dim))
        else:
            for block in blocks:
                x = block(x, training=False)
        return x, lambda: head(x[:, prefix:] if prefix else x, training=False)

    flat = ops.reshape(x, (-1, dim))
    if layout == "padded":
        index = padded_layout(sequence_alive, sizes[0])
        slotted = gather_rows(flat, index["slot_token"])
        for block in blocks:
            slotted = block(slotted, keep_mask=index["slot_valid"], training=False)
        back = gather_rows(ops.reshape(slotted, (-1, dim)), index["token_slot"])
    elif layout in ("packed", "ragged"):
        index = packed_layout(sequence_alive, sizes[1], sizes[0])
        rows = gather_rows(flat, index["row_token"])[None]
        bias = None if layout == "ragged" else key_bias(index["slot_valid"], rows.dtype)
        for block in blocks:
            if layout == "ragged":
                rows = block.call_ragged(rows, sizes[2:])
            else:
                rows = block.call_packed(rows, index["slot_row"], index["row_slot"], bias)
        slotted = gather_rows(rows[0], index["slot_row"])
        back = gather_rows(rows[0], index["token_row"])
    else:
        raise ValueError(f"Unknown layout {layout!r}.")

    def grade():
        graded = index["slot_valid"]
        if prefix:  # the prefix tokens hold each image's first slots
            graded = graded & (ops.arange(ops.shape(graded)[1], dtype="int32") >= prefix)[None]
        presence, mask_slots = head(slotted, keep_mask=graded, training=False)
        return presence, _slots_to_tokens(mask_slots, index["token_slot"][:, prefix:], alive)

    return back, grade


def _slots_to_tokens(mask_slots, token_slot, alive):
    # (batch, classes, slots) -> (batch, classes, tokens), 0 where not alive.
    classes = ops.shape(mask_slots)[1]
    per_slot = ops.reshape(ops.transpose(mask_slots, (0, 2, 1)), (-1, classes))
    per_token = ops.transpose(gather_rows(per_slot, token_slot), (0, 2, 1))
    return ops.where(alive[:, None, :], per_token, ops.zeros_like(per_token))


def _round_up(value, multiple):
    return int(math.ceil(value / multiple) * multiple)
