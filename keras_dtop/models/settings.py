"""A segmenter's pruning settings: validated properties the stage engine reads per call.

`PruningSettings` holds p0, k, the mode, capacities, bucket and device
policy of a `DToPSegmenter`. Nothing is cached on them: the engine derives
an `ExecutionPlan` from their values at every call, so a change made through
any attribute (the model's or `model.pruner`'s) takes effect on the next one.
Each check returns the normalised value or raises a `ValueError`/`TypeError`
that names the setting and the value, before anything reaches a backend.
"""

import numbers

from keras_dtop.layers.pruning import check_threshold
from keras_dtop.models.stage_runner import ExecutionPolicy, check_thresholds_per_head

PRUNING_MODES = ("auto", "gathered", "masked", "capacity")


def check_pruning_mode(value):
    """One of `PRUNING_MODES`."""
    if value not in PRUNING_MODES:
        raise ValueError(f"pruning_mode must be one of {PRUNING_MODES}, got {value!r}.")
    return value


def check_stage_capacity(value, num_pruning_heads):
    """None, or one int >= 1 / float in (0, 1] per pruning head."""
    if value is None:
        return None
    if isinstance(value, (numbers.Real,)) and not isinstance(value, bool):
        value = [value] * num_pruning_heads
    value = list(value)
    if len(value) != num_pruning_heads:
        raise ValueError(
            f"stage_capacity needs one entry per pruning head ({num_pruning_heads}), got {value}."
        )
    checked = []
    for c in value:
        if isinstance(c, bool) or not isinstance(c, numbers.Real):
            raise TypeError(f"stage_capacity entries must be ints or floats, got {c!r}.")
        if isinstance(c, numbers.Integral):
            if c < 1:
                raise ValueError(f"stage_capacity ints must be >= 1 token, got {c}.")
            checked.append(int(c))
        elif not 0.0 < c <= 1.0:
            raise ValueError(f"stage_capacity floats are fractions in (0, 1], got {c}.")
        else:
            checked.append(float(c))
    return tuple(checked)


def check_token_bucket(value):
    """None (the backend's default) or an int >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"token_bucket must be None or an int >= 1, got {value!r}.")
    return int(value)


class PruningSettings:
    """The pruning controls of `DToPSegmenter` (a mixin; `self.pruner` and `self._engine` exist)."""

    @property
    def prune_threshold(self):
        """p0: tokens with best score strictly above it are exit candidates.

        One float for every pruning head, or a tuple with one value per pruning
        head (`len(stage_ends) - 1`); 1.0 disables pruning (at that head).
        """
        return self.pruner.prune_threshold

    @prune_threshold.setter
    def prune_threshold(self, value):
        value = check_threshold(value)
        check_thresholds_per_head(value, len(self.stage_ends) - 1)
        self.pruner.prune_threshold = value

    @property
    def keep_top_k(self):
        """k: most confident candidates kept alive per predicted class."""
        return self.pruner.keep_top_k

    @keep_top_k.setter
    def keep_top_k(self, value):
        self.pruner.keep_top_k = value  # validated by TokenPruner

    @property
    def pruning_enabled(self):
        """False runs the model densely whatever p0 is (p0 is kept)."""
        return self._pruning_enabled

    @pruning_enabled.setter
    def pruning_enabled(self, value):
        self._pruning_enabled = bool(value)

    @property
    def pruning_mode(self):
        """"auto" (= "gathered" at inference), "gathered", "masked" or "capacity"."""
        return self._pruning_mode

    @pruning_mode.setter
    def pruning_mode(self, value):
        self._pruning_mode = check_pruning_mode(value)

    @property
    def stage_capacity(self):
        """Per pruning head: tokens (int) or fraction of tokens (float) the next stage holds."""
        return self._stage_capacity

    @stage_capacity.setter
    def stage_capacity(self, value):
        self._stage_capacity = check_stage_capacity(value, len(self.stage_ends) - 1)

    @property
    def token_bucket(self):
        """Rounding of "gathered" capacities (None: backend default)."""
        return self._token_bucket

    @token_bucket.setter
    def token_bucket(self, value):
        self._token_bucket = check_token_bucket(value)

    @property
    def execution_policy(self):
        """How this device runs pruned stages (`keras_dtop.models.ExecutionPolicy`).

        Defaults to the backend's (`ExecutionPolicy.for_backend()`); set it to
        fix a choice (e.g. `per_image_attention=False`) instead of measuring.
        """
        return self._engine.policy

    @execution_policy.setter
    def execution_policy(self, policy):
        if not isinstance(policy, ExecutionPolicy):
            raise TypeError(f"execution_policy must be an ExecutionPolicy, got {policy!r}.")
        self._engine.policy = policy

    @property
    def engine(self):
        """The `StageRunner` that runs this model's stages."""
        return self._engine

    def stage_token_capacities(self, num_tokens):
        """Capacity mode: slots of every stage after the first, as ints in [1, tokens]."""
        return self._engine.stage_token_capacities(num_tokens)

    def inference_mode(self, training=False):
        """The execution a call with this `training` flag uses: "masked", "gathered" or "capacity"."""
        return self._engine.plan(training=training).mode

    @property
    def prunes(self):
        """Whether the auxiliary heads make exit decisions."""
        return self._engine.plan().prunes
