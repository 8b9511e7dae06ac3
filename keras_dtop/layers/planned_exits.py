"""Exit patterns fixed in advance, for benchmarks and execution-mode tests.

An untrained grading head prunes arbitrarily (often everything or nothing).
To time and test the execution modes on realistic, mixed batches, this pruner
replaces the grading rule's decision with a plan: after head j, image b keeps
`round(keep_fractions[b, j] · tokens)` tokens (at least 1). Which tokens stay
depends only on their index and the image's position in the batch (a fixed
permutation), not on scores, so every execution mode makes exactly the same
decisions for the same batch. Canvas and scores are the
real ones. This is a measuring tool, not part of the method.
"""

import keras
import numpy as np
from keras import ops

from keras_dtop.layers.pruning import TokenPruner


@keras.saving.register_keras_serializable(package="keras_dtop")
class PlannedExitPruner(TokenPruner):
    """`TokenPruner` whose exits follow `keep_fractions` `(max_batch, pruning_heads)`.

    The plan is a non-trainable variable, so `set_plan` takes effect without
    recompiling; installing the pruner changes the model's execution plan, so
    programs built for the previous pruner are not reused. Batches may be smaller than `max_batch` (first rows used).
    """

    def __init__(self, max_batch, num_pruning_heads, **kwargs):
        super().__init__(**kwargs)
        self.max_batch = int(max_batch)
        self.num_pruning_heads = int(num_pruning_heads)
        self.plan = self.add_weight(
            shape=(self.max_batch, self.num_pruning_heads),
            initializer="ones",
            trainable=False,
            name="keep_fractions",
        )

    def set_plan(self, keep_fractions):
        plan = np.asarray(keep_fractions, dtype="float32")
        if plan.ndim == 1:
            plan = plan[:, None]
        rows, heads = plan.shape
        if rows > self.max_batch or heads != self.num_pruning_heads:
            raise ValueError(
                f"keep_fractions must be (<= {self.max_batch}, {self.num_pruning_heads}), "
                f"got {plan.shape}."
            )
        if not np.all((plan > 0) & (plan <= 1)) or np.any(np.diff(plan, axis=1) > 0):
            raise ValueError("keep_fractions must be in (0, 1] and non-increasing over heads.")
        full = np.ones((self.max_batch, self.num_pruning_heads), "float32")
        full[:rows] = plan
        self.plan.assign(full)

    def call(self, presence_logits, mask_logits, canvas, alive, prune=True, stage=None):
        canvas, scores, _ = super().call(presence_logits, mask_logits, canvas, alive, prune=False)
        if not prune:
            return canvas, scores, ops.zeros_like(alive)
        if stage is None:
            raise ValueError("PlannedExitPruner needs the stage index of the head.")
        alive = ops.cast(alive, "bool")
        batch, tokens = ops.shape(alive)[0], ops.shape(alive)[1]
        if isinstance(batch, int) and batch > self.max_batch:
            raise ValueError(f"Batch of {batch} images, but the plan has {self.max_batch} rows.")
        fraction = ops.cast(self.plan, "float32")[:batch, stage]
        keep = ops.maximum(ops.cast(ops.round(fraction * ops.cast(tokens, "float32")), "int32"), 1)
        # A fixed permutation of the tokens (7919 is prime) decides who stays.
        index = ops.arange(tokens, dtype="int32")[None, :]
        image = ops.arange(batch, dtype="int32")[:, None]
        order = (index * 7919 + image * 104729) % tokens
        order = ops.where(alive, order, order + tokens)
        rank = ops.argsort(ops.argsort(order, axis=-1), axis=-1)
        exits = alive & (rank >= keep[:, None])
        return canvas, scores, exits

    def get_config(self):
        config = super().get_config()
        config.update(max_batch=self.max_batch, num_pruning_heads=self.num_pruning_heads)
        return config


def plan_exits(model, keep_fractions, max_batch=None):
    """Make `model` (a `DToPSegmenter`) follow `keep_fractions` instead of its graders.

    keep_fractions: `(batch, pruning heads)` fraction of all tokens still alive
    after each auxiliary head. Returns the installed `PlannedExitPruner`;
    call its `set_plan` to change the plan later.
    """
    plan = np.asarray(keep_fractions, dtype="float32")
    pruner = model.pruner
    if not isinstance(pruner, PlannedExitPruner) or (max_batch or len(plan)) > pruner.max_batch:
        pruner = PlannedExitPruner(
            max_batch or len(plan),
            len(model.stage_ends) - 1,
            prune_threshold=model.prune_threshold,
            keep_top_k=model.keep_top_k,
            name="planned_exit_pruner",
        )
        model.pruner = pruner
    pruner.set_plan(plan)
    return pruner
