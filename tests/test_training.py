"""Training: the loss inside a step, fit/evaluate in both phases, gradient flow,
resuming from a .keras file, label validation."""

import keras
import numpy as np
import pytest
from conftest import gradient, to_numpy
from test_losses import hand_loss

import keras_dtop
from keras_dtop.data import synthetic_dataset, synthetic_segmentation
from keras_dtop.layers import update_canvas

NUM_CLASSES = 6


def small_model(prune_threshold=1.0, **overrides):
    """2-layer ViT, patch 8 on 32x32 (16 tokens), two stages: quick to compile."""
    backbone = keras_dtop.DToPBackbone(
        patch_size=8,
        hidden_dim=32,
        num_layers=2,
        num_heads=2,
        mlp_dim=64,
        image_size=(32, 32),
        stage_ends=(0, 1),
    )
    config = dict(
        num_classes=NUM_CLASSES,
        head_hidden_dim=16,
        head_num_heads=2,
        head_num_layers=1,
        prune_threshold=prune_threshold,
        keep_top_k=1,
        head_dropout=0.0,
        preprocessor=keras_dtop.DToPImageSegmenterPreprocessor(
            image_converter=keras_dtop.DToPImageConverter.from_mean_std()
        ),
    )
    config.update(overrides)
    return keras_dtop.DToPSegmenter(backbone, **config)


@pytest.fixture(scope="module")
def data():
    images, labels = synthetic_segmentation(32, image_size=(32, 32), num_classes=NUM_CLASSES)
    return images.astype("float32"), labels.astype("int32")


def test_training_step_loss_equals_hand_computation(data):
    images, labels = data
    model = small_model()
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), metrics=[])
    logs = model.train_on_batch(images[:4], labels[:4], return_dict=True)
    normalised = to_numpy(model.preprocessor.image_converter(images[:4]))
    details = to_numpy(model(normalised, training=False, return_details=True))
    expected = [
        hand_loss(h["presence_logits"], h["canvas"], labels[:4], (4, 4))
        for h in details["heads"]
    ]
    np.testing.assert_allclose(logs["loss"], sum(expected), rtol=1e-4)
    np.testing.assert_allclose(logs["loss_stage_1"], expected[0], rtol=1e-4)
    np.testing.assert_allclose(logs["loss_stage_2"], expected[1], rtol=1e-4)


def test_fit_both_phases_and_evaluate(data):
    images, labels = data
    model = small_model()
    model.compile(optimizer=keras_dtop.optimizers.DToPAdamW(learning_rate=2e-3))
    dense = model.fit(images, labels, batch_size=8, epochs=6, verbose=0).history
    assert dense["loss"][-1] < 0.8 * dense["loss"][0], dense["loss"]
    for key in ("loss_stage_1", "loss_stage_2", "alive_stage_1", "miou"):
        assert key in dense, sorted(dense)
    assert dense["alive_stage_1"][-1] == 1.0

    # Phase 2: the pruning fine-tune on the same model, pruning active in training.
    model.prune_threshold = 0.3
    pruned = model.fit(images, labels, batch_size=8, epochs=4, verbose=0).history
    assert pruned["alive_stage_1"][0] < 1.0, "the fine-tune should prune"
    assert pruned["loss"][-1] < pruned["loss"][0], pruned["loss"]

    result = model.evaluate(images, labels, batch_size=8, verbose=0, return_dict=True)
    assert 0.0 <= result["miou"] <= 1.0
    assert 0.0 < result["alive_stage_1"] <= 1.0
    assert np.isfinite(result["loss"]) and "loss_stage_2" in result


def test_fit_on_tf_data_with_callbacks(tmp_path):
    model = small_model()
    model.compile(optimizer=keras_dtop.optimizers.DToPAdamW(learning_rate=1e-3))
    train = synthetic_dataset(16, batch_size=8, image_size=(32, 32), num_classes=NUM_CLASSES)
    val = synthetic_dataset(8, batch_size=8, image_size=(32, 32), num_classes=NUM_CLASSES, seed=1)
    callbacks = [
        keras.callbacks.ModelCheckpoint(tmp_path / "best.keras", monitor="val_loss"),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=5),
        keras.callbacks.TensorBoard(tmp_path / "logs"),
    ]
    history = model.fit(train, validation_data=val, epochs=2, callbacks=callbacks, verbose=0)
    assert "val_miou" in history.history and "val_loss_stage_2" in history.history
    assert (tmp_path / "best.keras").exists()
    assert any((tmp_path / "logs").rglob("events.out.tfevents.*"))
    restored = keras.saving.load_model(tmp_path / "best.keras")
    assert isinstance(restored, keras_dtop.DToPSegmenter)


def test_resume_training_from_keras_file(tmp_path, data):
    images, labels = data
    model = small_model(prune_threshold=0.5)
    model.compile(optimizer=keras_dtop.optimizers.dtop_optimizer(total_steps=100, warmup_steps=2))
    model.fit(images, labels, batch_size=8, epochs=1, verbose=0)
    path = tmp_path / "trained.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert int(to_numpy(restored.optimizer.iterations)) == 4
    assert restored.optimizer.head_lr_multiplier == 10.0
    for a, b in zip(model.get_weights(), restored.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(
        restored.predict(images[:4], verbose=0), model.predict(images[:4], verbose=0), atol=1e-5
    )
    history = restored.fit(images, labels, batch_size=8, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][0])
    assert int(to_numpy(restored.optimizer.iterations)) == 8


def test_exited_tokens_get_no_gradient_through_later_layers():
    model = small_model()
    tokens = np.random.default_rng(0).normal(size=(2, 16, 32)).astype("float32")
    keep = np.ones((2, 16), bool)
    keep[0, 5:] = False
    keep[1, ::2] = False
    block = model.backbone.encoder_blocks[1]
    grads = gradient(lambda x: block(x, keep_mask=keep, training=True), tokens)
    assert np.all(grads[~keep] == 0.0)
    assert np.all(np.abs(grads[keep]).sum(-1) > 0)
    head = model.grading_heads[1]
    grads = gradient(lambda x: head(x, keep_mask=keep, training=True)[0], tokens)
    assert np.all(grads[~keep] == 0.0) and np.abs(grads[keep]).sum() > 0


def test_earlier_heads_get_gradient_through_the_canvas():
    rng = np.random.default_rng(0)
    first = rng.normal(size=(2, NUM_CLASSES, 16)).astype("float32")
    second = rng.normal(size=(2, NUM_CLASSES, 16)).astype("float32")
    seen = np.ones((2, 16), bool)
    seen[:, :6] = False  # exited after the first head

    grads = gradient(lambda m: update_canvas(update_canvas(None, m, None), second, seen), first)
    assert np.all(grads[:, :, :6] == 1.0) and np.all(grads[:, :, 6:] == 0.0)


def test_training_forward_prunes_and_detaches_decisions(data):
    images, labels = data
    model = small_model(prune_threshold=0.2)
    details = to_numpy(model(images[:4] / 255.0, training=True, return_details=True))
    assert (details["alive_counts"][:, 1] < 16).any()


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda y: y.astype("float32"), "integer class ids"),
        (lambda y: np.where(y == 1, 9, y), r"in \[0, 6\) or 255"),
        (lambda y: np.where(y == 1, -3, y), r"found \[-3\]"),
        (lambda y: y[:, :16], "do not match images"),
        (lambda y: y[..., None], r"shape \(batch, height, width\)"),
    ],
)
def test_bad_labels_raise_before_any_step(data, bad, message):
    images, labels = data
    model = small_model()
    model.compile()
    with pytest.raises(ValueError, match=message):
        model.fit(images, bad(labels), batch_size=8, epochs=1, verbose=0)
    assert int(to_numpy(model.optimizer.iterations)) == 0
    with pytest.raises(ValueError, match=message):
        model.evaluate(images, bad(labels), batch_size=8, verbose=0)


def test_bad_labels_in_a_dataset(data):
    import tensorflow as tf

    images, labels = data
    model = small_model()
    model.compile()
    ds = tf.data.Dataset.from_tensor_slices((images, np.where(labels == 2, 7, labels))).batch(8)
    with pytest.raises(ValueError, match="found"):
        model.fit(ds, epochs=1, verbose=0)
    ds = tf.data.Dataset.from_tensor_slices((images, labels.astype("float32"))).batch(8)
    with pytest.raises(ValueError, match="integer class ids"):
        model.fit(ds, epochs=1, verbose=0)
