"""DToP's grading rule and canvas (design doc §3), as pure tensor functions.

They only see full-length `(batch, classes, tokens)` tensors and a bool alive
mask, so they do not depend on how the encoder blocks execute (masked,
gathered, fixed capacity). Everything is vectorised over the batch with static
shapes: no per-image loop, no boolean indexing, no `nonzero`.
"""

import numbers

import keras
from keras import ops


def token_scores(presence_logits, mask_logits):
    """Score `P[c, t] = softmax(presence[c])[present] · sigmoid(mask[c, t])`.

    presence_logits: `(batch, classes, 2)`; mask_logits: `(batch, classes, tokens)`.
    Returns float32 `(batch, classes, tokens)` in (0, 1), not normalised over
    classes: under mixed precision the rule decides on float32 scores.
    """
    present = ops.softmax(ops.cast(presence_logits, "float32"), axis=-1)[..., 0]
    return present[..., None] * ops.sigmoid(ops.cast(mask_logits, "float32"))


def update_canvas(canvas, mask_logits, seen):
    """Write `mask_logits` into the columns of tokens the current head saw.

    canvas, mask_logits: `(batch, classes, tokens)` (canvas may be None before
    the first head); seen: bool `(batch, tokens)`. Column t ends up holding the
    logits of the last head that saw token t. Not detached: gradients of later
    losses reach the heads where tokens exited.
    """
    if canvas is None:
        return mask_logits
    return ops.where(ops.cast(seen, "bool")[:, None, :], mask_logits, canvas)


def _first_index_where(condition, axis):
    """Lowest index along `axis` where `condition` holds (size of the axis if none)."""
    size = ops.shape(condition)[axis]
    shape = [1] * len(condition.shape)
    shape[axis] = size
    index = ops.reshape(ops.arange(size, dtype="int32"), shape)
    return ops.min(ops.where(condition, index, size), axis=axis)


def select_exits(scores, alive, threshold, keep_top_k):
    """The grading rule: which alive tokens exit at this stage.

    A token is a candidate iff it is alive and its best class score is
    strictly above `threshold` (p0). Per class (its argmax, lowest class id on
    ties), the `keep_top_k` most confident candidates stay alive as context
    (ties broken by lower token index); every other candidate exits. At least
    one token per image always stays alive. `threshold >= 1` exits nothing.

    Args:
        scores: `(batch, classes, tokens)` token scores of this stage's head.
        alive: bool `(batch, tokens)`, tokens alive before this stage's decision.
        threshold: p0, a Python float.
        keep_top_k: k >= 0, a Python int.

    Returns bool `(batch, tokens)`: the tokens that exit here (a subset of `alive`).
    """
    scores = ops.stop_gradient(ops.cast(scores, "float32"))
    alive = ops.cast(alive, "bool")
    num_classes, num_tokens = scores.shape[1], scores.shape[2]
    confidence = ops.max(scores, axis=1)  # (B, N)
    label = _first_index_where(scores == confidence[:, None, :], axis=1)  # (B, N)
    candidate = alive & (confidence > ops.cast(threshold, "float32"))

    k = min(int(keep_top_k), num_tokens)
    if k > 0:
        classes = ops.arange(num_classes, dtype="int32")[None, :, None]
        in_class = (label[:, None, :] == classes) & candidate[:, None, :]  # (B, C, N)
        ranked = ops.broadcast_to(confidence[:, None, :], ops.shape(in_class))
        context = ops.any(top_k_mask(ranked, k, in_class), axis=1)
        exits = candidate & ~context
    else:
        exits = candidate

    # Guard (reachable only for k = 0): never empty an image; keep its most
    # confident alive token, lowest index on ties.
    emptied = ~ops.any(alive & ~exits, axis=-1, keepdims=True)
    alive_confidence = ops.where(alive, confidence, -1.0)
    best = ops.max(alive_confidence, axis=-1, keepdims=True)
    best_index = _first_index_where(alive_confidence == best, axis=-1)
    is_best = ops.arange(num_tokens, dtype="int32")[None, :] == best_index[:, None]
    return exits & ~(emptied & is_best)


def top_k_mask(values, k, eligible):
    """Bool mask of the `k` largest eligible `values` along the last axis.

    min(k, eligible count) entries are True; ties at the k-th value go to the
    lowest indices. values `(..., n)`, eligible bool `(..., n)`, k a Python
    int in [1, n].
    """
    ranked = ops.where(eligible, ops.cast(values, "float32"), -float("inf"))
    kth = ops.top_k(ranked, k, sorted=True)[0][..., -1:]
    above = eligible & (ranked > kth)
    at_kth = eligible & (ranked == kth)
    quota = k - ops.sum(ops.cast(above, "int32"), axis=-1, keepdims=True)
    return above | (at_kth & (ops.cumsum(ops.cast(at_kth, "int32"), axis=-1) <= quota))


@keras.saving.register_keras_serializable(package="keras_dtop")
class TokenPruner(keras.layers.Layer):
    """One grading step: canvas update, scores, and (optionally) the exit rule.

    Holds p0 (`prune_threshold`) and k (`keep_top_k`); both may be changed
    after construction. Stateless otherwise. p0 is one float for every
    pruning head, or a tuple with one value per pruning head (head `stage`
    decides with `prune_threshold[stage]`; 1.0 there means that head never
    prunes).

    Call arguments:
        presence_logits: `(batch, classes, 2)` from this stage's head.
        mask_logits: `(batch, classes, tokens)` from this stage's head.
        canvas: `(batch, classes, tokens)` or None before the first head.
        alive: bool `(batch, tokens)`, tokens the head saw.
        prune: whether to apply the rule (False for the final head).
        stage: index of the head: picks the head's p0 when p0 is per stage.

    Returns `(canvas, scores, exits)`: the new canvas, this head's score map
    `(batch, classes, tokens)` over the canvas, and the bool exits
    `(batch, tokens)` decided here (all False when `prune` is False).
    """

    def __init__(self, prune_threshold=0.9, keep_top_k=5, **kwargs):
        super().__init__(**kwargs)
        self.prune_threshold = prune_threshold
        self.keep_top_k = keep_top_k
        # No weights to create. An unbuilt layer would make JAX's
        # `predict_on_batch`/`test_on_batch` run the whole model once more
        # on every call, to build it.
        self.built = True

    @property
    def prune_threshold(self):
        return self._prune_threshold

    @prune_threshold.setter
    def prune_threshold(self, value):
        self._prune_threshold = check_threshold(value)

    @property
    def lowest_threshold(self):
        """The smallest p0 of any head: pruning happens somewhere iff it is < 1."""
        p0 = self.prune_threshold
        return min(p0) if isinstance(p0, tuple) else p0

    def threshold_at(self, stage):
        """p0 of pruning head `stage` (0-based)."""
        p0 = self.prune_threshold
        if not isinstance(p0, tuple):
            return p0
        if stage is None or not 0 <= stage < len(p0):
            raise ValueError(
                f"prune_threshold holds {len(p0)} values (one per pruning head), "
                f"but pruning head {stage} asked for its p0."
            )
        return p0[stage]

    @property
    def keep_top_k(self):
        return self._keep_top_k

    @keep_top_k.setter
    def keep_top_k(self, value):
        self._keep_top_k = check_top_k(value)

    def call(self, presence_logits, mask_logits, canvas, alive, prune=True, stage=None):
        canvas = update_canvas(canvas, mask_logits, alive)
        scores = token_scores(presence_logits, canvas)
        threshold = self.threshold_at(stage) if prune else 1.0
        if threshold < 1.0:
            exits = select_exits(scores, alive, threshold, self.keep_top_k)
        else:
            exits = ops.zeros_like(alive)
        return canvas, scores, exits

    def get_config(self):
        config = super().get_config()
        config.update(prune_threshold=self.prune_threshold, keep_top_k=self.keep_top_k)
        return config


def check_threshold(value):
    """Validate p0: a number in (0, 1], or a non-empty sequence of them (a tuple)."""
    if hasattr(value, "tolist") and getattr(value, "ndim", 0) == 1:  # NumPy / backend vectors
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("prune_threshold (p0) is an empty sequence: give one value per pruning head.")
        return tuple(_check_one_threshold(v) for v in value)
    return _check_one_threshold(value)


def _check_one_threshold(value):
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # NumPy scalars
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"prune_threshold (p0) must be a float in (0, 1] or a sequence of them, got {value!r}."
        )
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise ValueError(
            f"prune_threshold (p0) must be in (0, 1] (1.0 disables pruning), got {value}."
        )
    return value


def check_top_k(value):
    """Validate k: a non-negative integer."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"keep_top_k must be a non-negative int, got {value!r}.")
    if value < 0:
        raise ValueError(f"keep_top_k must be >= 0, got {value}.")
    return int(value)
