"""Train a small DToP segmenter deterministically and save it: `python train_for_export.py OUT.keras`.

Run under each KERAS_BACKEND by the export tests: the weights start from the
same NumPy values and take the same SGD steps (no dropout, no shuffling), so
the saved models differ only by floating-point rounding between backends.
"""

import sys

import keras
import numpy as np
from conftest import set_threshold_between_tokens, tiny_backbone, tiny_segmenter, varied_images

import keras_dtop


def export_test_model(backbone_overrides=None, **overrides):
    """64x64 inputs, patch 8 (64 tokens), 4 layers in 3 stages, raw-pixel preprocessor."""
    converter = keras_dtop.DToPImageConverter.from_mean_std()
    preprocessor = keras_dtop.DToPImageSegmenterPreprocessor(image_converter=converter)
    config = dict(head_dropout=0.0, preprocessor=preprocessor)
    config.update(overrides)
    return tiny_segmenter(tiny_backbone(patch_size=8, **(backbone_overrides or {})), **config)


def train_deterministically(model, steps=2):
    rng = np.random.default_rng(0)
    model.set_weights(
        [rng.normal(0.0, 0.2, w.shape).astype("float32") + (w.path.endswith("gamma")) for w in model.weights]
    )
    images = varied_images(8, seed=1)
    labels = rng.integers(0, model.num_classes, (8, 64, 64)).astype("int32")
    # Eager steps: quicker than tracing for two steps, except on JAX (slow op by op).
    model.compile(optimizer=keras.optimizers.SGD(0.05), run_eagerly=keras.backend.backend() != "jax")
    model.fit(images, labels, batch_size=4, epochs=steps // 2, shuffle=False, verbose=0)
    set_threshold_between_tokens(model, varied_images(16, seed=2))
    return model


if __name__ == "__main__":
    train_deterministically(export_test_model()).save(sys.argv[1])
