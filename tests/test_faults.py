"""Training that survives faults: interrupted fits resume exactly, NaN stops a
run, a batch where every token exits still trains, pruning-phase checkpoints
resume with pruning on."""

import keras
import numpy as np
import pytest
from conftest import to_numpy
from test_training import NUM_CLASSES, small_model

import keras_dtop
from keras_dtop.data import synthetic_segmentation


class Crash(Exception):
    pass


class CrashAtStep(keras.callbacks.Callback):
    """Raises at the given global training step: a killed process, as far as fit knows."""

    def __init__(self, step):
        super().__init__()
        self.step, self.seen = step, 0

    def on_train_batch_begin(self, batch, logs=None):
        if self.seen == self.step:
            raise Crash(f"killed at step {self.step}")
        self.seen += 1


@pytest.fixture(scope="module")
def data():
    images, labels = synthetic_segmentation(8, image_size=(32, 32), num_classes=NUM_CLASSES, seed=3)
    return images.astype("float32"), labels.astype("int32")


def fresh_model(prune_threshold):
    keras.utils.set_random_seed(7)
    model = small_model(prune_threshold=prune_threshold)
    model.compile(optimizer=keras_dtop.optimizers.dtop_optimizer(total_steps=40, warmup_steps=2))
    return model


def fit(model, data, callbacks=()):
    images, labels = data
    return model.fit(images, labels, batch_size=4, epochs=3, shuffle=False, verbose=0, callbacks=list(callbacks))


def state(model):
    return [to_numpy(v) for v in model.weights] + [to_numpy(v) for v in model.optimizer.variables]


@pytest.mark.parametrize("prune_threshold", [1.0, 0.3], ids=["dense phase", "pruning phase"])
def test_backup_and_restore_resumes_a_killed_fit_exactly(tmp_path, data, prune_threshold):
    reference = fresh_model(prune_threshold)
    fit(reference, data)

    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    crashed = fresh_model(prune_threshold)
    with pytest.raises(Crash):
        fit(crashed, data, [backup, CrashAtStep(3)])  # mid-way through epoch 2 (2 steps per epoch)
    resumed = fresh_model(prune_threshold)  # a new process: same code, the backup on disk
    history = fit(resumed, data, [keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))])
    assert len(history.history["loss"]) == 2  # epoch 1 came from the backup
    assert int(to_numpy(resumed.optimizer.iterations)) == 6
    for got, expected in zip(state(resumed), state(reference)):
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_terminate_on_nan_stops_a_diverging_run(data):
    images, labels = data
    model = fresh_model(1.0)
    images = images.copy()
    images[:] = np.nan  # fit does not scan pixels; the loss turns NaN at the first step
    history = model.fit(
        images, labels, batch_size=4, epochs=3, verbose=0, callbacks=[keras.callbacks.TerminateOnNaN()]
    )
    assert model.stop_training
    assert len(history.history["loss"]) == 1 and np.isnan(history.history["loss"][0])


def test_a_batch_where_every_token_exits_at_the_first_head_trains(data):
    images, labels = data
    model = fresh_model(1e-6)  # every token is a candidate; k = 0 keeps none as context
    model.keep_top_k = 0
    details = model.predict_details(images[:4])
    assert (details["alive_counts"][:, 1] == 1).all()  # the rule's guard: one token per image stays
    before = [to_numpy(w) for w in model.trainable_weights]
    logs = model.train_on_batch(images[:4], labels[:4], return_dict=True)
    assert np.isfinite(logs["loss"]) and logs["alive_stage_1"] == 1 / 16
    after = [to_numpy(w) for w in model.trainable_weights]
    assert all(np.isfinite(w).all() for w in after)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))


def test_pruning_phase_checkpoint_resumes_with_pruning_on(tmp_path, data):
    images, labels = data
    model = fresh_model(0.1)
    model.keep_top_k = 2
    path = tmp_path / "epoch.keras"
    model.fit(images, labels, batch_size=4, epochs=1, verbose=0,
              callbacks=[keras.callbacks.ModelCheckpoint(str(path))])  # fmt: skip
    restored = keras_dtop.models.load_segmenter(path)
    assert restored.pruning_enabled and restored.prune_threshold == 0.1 and restored.keep_top_k == 2
    assert restored.prunes
    assert int(to_numpy(restored.optimizer.iterations)) == 2
    np.testing.assert_array_equal(
        restored.predict_details(images)["exit_stage"], model.predict_details(images)["exit_stage"]
    )
    history = restored.fit(images, labels, batch_size=4, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][0]) and history["alive_stage_1"][0] < 1.0
