"""The DToP optimiser recipe (design doc §4.4): AdamW with a 10x learning rate on
the grading heads, linear warm-up, then poly decay."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_dtop")
class WarmupPolyDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from `warmup_factor · lr` to `lr` over `warmup_steps`, then
    `lr · (1 - t)^power` with t going from 0 to 1 between `warmup_steps` and
    `decay_steps` (0 afterwards), as the authors' mmseg schedule does."""

    def __init__(self, learning_rate, decay_steps, warmup_steps=1500, power=0.9, warmup_factor=1e-6):
        if decay_steps <= warmup_steps:
            raise ValueError(
                f"decay_steps ({decay_steps}) must be larger than warmup_steps ({warmup_steps})."
            )
        self.learning_rate = float(learning_rate)
        self.decay_steps = int(decay_steps)
        self.warmup_steps = int(warmup_steps)
        self.power = float(power)
        self.warmup_factor = float(warmup_factor)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warm = float(max(self.warmup_steps, 1))
        warmup = self.warmup_factor + (1.0 - self.warmup_factor) * ops.minimum(step / warm, 1.0)
        progress = (step - self.warmup_steps) / float(self.decay_steps - self.warmup_steps)
        poly = ops.power(1.0 - ops.clip(progress, 0.0, 1.0), self.power)
        factor = ops.where(step < self.warmup_steps, warmup, poly)
        return self.learning_rate * factor

    def get_config(self):
        return dict(
            learning_rate=self.learning_rate,
            decay_steps=self.decay_steps,
            warmup_steps=self.warmup_steps,
            power=self.power,
            warmup_factor=self.warmup_factor,
        )


@keras.saving.register_keras_serializable(package="keras_dtop")
class DToPAdamW(keras.optimizers.Adam):
    """AdamW whose learning rate (and so its decoupled weight decay) is multiplied
    by `head_lr_multiplier` for variables whose path contains `head_pattern`.

    Scaling gradients would not do this under Adam (the update is invariant
    to gradient scale), so the rate itself is scaled per variable, exactly
    like a second parameter group in PyTorch.
    """

    def __init__(
        self,
        learning_rate=2e-5,
        weight_decay=0.01,
        head_lr_multiplier=10.0,
        head_pattern="grading_head",
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-8,
        **kwargs,
    ):
        kwargs.pop("name", None)
        super().__init__(
            learning_rate=learning_rate,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            name="dtop_adamw",
            **kwargs,
        )
        self.decoupled_weight_decay = float(weight_decay)
        self.head_lr_multiplier = float(head_lr_multiplier)
        self.head_pattern = head_pattern
        self._head_keys = set()

    def build(self, variables):
        super().build(variables)
        self._head_keys = {
            self._var_key(v) for v in variables if self.head_pattern in v.path
        }

    def update_step(self, gradient, variable, learning_rate):
        if self._var_key(variable) in self._head_keys:
            learning_rate = learning_rate * self.head_lr_multiplier
        if self.decoupled_weight_decay:
            lr = ops.cast(learning_rate, variable.dtype)
            variable.assign(variable - variable * (self.decoupled_weight_decay * lr))
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        config = super().get_config()
        config.pop("name", None)
        config.update(
            weight_decay=self.decoupled_weight_decay,
            head_lr_multiplier=self.head_lr_multiplier,
            head_pattern=self.head_pattern,
        )
        return config


def dtop_optimizer(
    total_steps,
    learning_rate=2e-5,
    warmup_steps=1500,
    weight_decay=0.01,
    head_lr_multiplier=10.0,
    power=0.9,
):
    """The authors' recipe: AdamW(lr, wd 0.01), heads x10, warm-up then poly decay.

    Pass it to `model.compile(optimizer=dtop_optimizer(total_steps=...))`.
    """
    schedule = WarmupPolyDecay(learning_rate, total_steps, warmup_steps=warmup_steps, power=power)
    return DToPAdamW(
        learning_rate=schedule, weight_decay=weight_decay, head_lr_multiplier=head_lr_multiplier
    )
