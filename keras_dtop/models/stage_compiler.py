"""Compile one DToP stage as one program, per backend.

The backend-specific code of inference (training's is in
`keras_dtop.distribute.replicas`). Pruned inference runs stage by stage:
the host reads the alive counts between stages (to pick the compact layout
and its capacities) and each stage then runs as one compiled program with no
host synchronisation inside it:

- TensorFlow: one `tf.function` per program; capacities are passed as
  tensors, so one trace serves every capacity (dynamic shapes, no XLA).
- JAX: `jax.jit` with the capacities static, so each capacity bucket compiles
  once; the model's variables are passed in as arguments (Keras'
  `StatelessScope`), not baked into the program as constants.
- PyTorch: eager (dynamic shapes cost nothing there).

A stage function has the signature `fn(static, sizes, *tensors)`: `static` is a
hashable tuple that selects the program (stage, layout, image size), `sizes` a
tuple of ints (capacities).
"""

import contextlib
import functools

import keras


def is_traced(x):
    """True inside a JAX trace or a TensorFlow graph: the host cannot read values."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return isinstance(x, jax.core.Tracer)
    if backend == "tensorflow":
        import tensorflow as tf

        return not tf.executing_eagerly()
    return False


def inference_context():
    """What `predict` runs under: PyTorch records no autograd graph (as Keras'
    own predict step does); without it eager inference keeps every
    activation for a backward pass that never comes (ViT-B at batch 8, 512x512:
    over 24 GB). A no-op on TensorFlow and JAX, whose programs are functional."""
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


def compile_stage_function(fn, model):
    """Wrap `fn(static, sizes, *tensors)` so that each program compiles once."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        programs = {}  # one tf.function per program, each traced once

        def run(static, sizes, *tensors):
            if static not in programs:
                # A partial per program: TF's retracing warning counts traces
                # per Python function (code object for lambdas).
                programs[static] = tf.function(functools.partial(fn, static), reduce_retracing=True)
            sizes = tuple(tf.constant(int(s), tf.int32) for s in sizes)
            return programs[static](sizes, *tensors)

        return run

    if backend == "jax":
        import jax

        variables = list(model.trainable_variables) + list(model.non_trainable_variables)

        def pure(values, static, sizes, *tensors):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return fn(static, sizes, *tensors)

        compiled = jax.jit(pure, static_argnums=(1, 2))

        def run(static, sizes, *tensors):
            # Inside Keras' own stateless steps `.value` is the step's state.
            values = [v.value for v in variables]
            return compiled(values, static, tuple(int(s) for s in sizes), *tensors)

        return run

    return fn
