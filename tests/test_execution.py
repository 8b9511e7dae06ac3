"""Pruned inference (gathered and capacity modes) against the masked reference."""

import keras
import numpy as np
import pytest
from conftest import random_images, tiny_backbone, tiny_segmenter, to_numpy, traced

from keras_dtop.flops import segmenter_flops
from keras_dtop.layers.planned_exits import plan_exits
from keras_dtop.layers.token_layout import gather_rows, packed_layout, padded_layout
from keras_dtop.models.stage_runner import ExecutionPolicy, choose_layout

# Image 0 keeps everything, image 1 a single token, the others in between.
MIXED_PLAN = [[1.0, 1.0], [0.01, 0.01], [0.5, 0.3], [0.9, 0.2]]


def _alive(seed=0, batch=3, tokens=10):
    alive = np.random.default_rng(seed).random((batch, tokens)) < 0.5
    alive[0] = True
    alive[1] = False
    alive[1, 7] = True
    return alive


def test_padded_layout_puts_alive_tokens_first_in_order():
    alive = _alive()
    slots = int(alive.sum(1).max())
    index = to_numpy(padded_layout(alive, slots))
    tokens = alive.shape[1]
    for b in range(len(alive)):
        kept = np.flatnonzero(alive[b])
        np.testing.assert_array_equal(index["slot_token"][b, : len(kept)], kept + b * tokens)
        np.testing.assert_array_equal(index["slot_valid"][b], np.arange(slots) < len(kept))
        np.testing.assert_array_equal(index["token_slot"][b, kept], b * slots + np.arange(len(kept)))


def test_packed_layout_round_trips_every_alive_token():
    alive = _alive(seed=3)
    batch, tokens = alive.shape
    total, slots = int(alive.sum()), int(alive.sum(1).max())
    x = np.arange(batch * tokens * 2, dtype="float32").reshape(batch * tokens, 2)
    index = packed_layout(alive, total + 3, slots)  # 3 padding rows
    rows = gather_rows(x, index["row_token"])
    back = to_numpy(gather_rows(rows, index["token_row"]))
    flat_alive = alive.reshape(-1)
    np.testing.assert_array_equal(back.reshape(-1, 2)[flat_alive], x[flat_alive])
    # Rows -> padded slots -> rows is the identity on real rows.
    slotted = gather_rows(rows, index["slot_row"])
    again = to_numpy(gather_rows(keras.ops.reshape(slotted, (-1, 2)), index["row_slot"]))
    np.testing.assert_array_equal(again[:total], to_numpy(rows)[:total])
    np.testing.assert_array_equal(to_numpy(rows)[:total], x[flat_alive])


@pytest.mark.parametrize("bucket, ragged", [(1, True), (1, False), (16, False), (64, False)])
def test_bucketed_capacities_never_drop_a_kept_token(bucket, ragged):
    rng = np.random.default_rng(bucket)
    for _ in range(200):
        batch = int(rng.integers(1, 9))
        counts = rng.integers(1, 257, size=batch)
        layout, sizes = choose_layout(counts, 256, bucket, ragged)
        if layout == "dense":
            assert counts.min() == 256
            continue
        slots = sizes[0]
        assert counts.max() <= slots <= 256
        assert slots % bucket == 0 or slots == 256
        if layout in ("packed", "ragged"):
            assert counts.sum() <= sizes[1] <= batch * 256
        if layout == "ragged":
            assert sizes[2:] == tuple(counts) and ragged
    assert choose_layout([256, 256], 256) == ("dense", ())
    assert choose_layout([256], 256) == ("dense", ())
    assert choose_layout([200], 256, 64) == ("padded", (256,))
    assert choose_layout([250, 10, 10, 10], 256, 16) == ("packed", (256, 320))
    assert choose_layout([250, 10, 10, 10], 256, 1, True) == ("ragged", (250, 280, 250, 10, 10, 10))
    assert choose_layout([100, 98], 256, 1, True)[0] == "padded"


def _mixed_model(image_size=(96, 96)):
    model = tiny_segmenter(tiny_backbone(image_size=image_size), prune_threshold=0.5)
    plan_exits(model, MIXED_PLAN)
    return model


def _run(model, images, mode, **settings):
    model.pruning_mode = mode
    for name, value in settings.items():
        setattr(model, name, value)
    return to_numpy(model(images, training=False, return_details=True))


def _assert_same_result(got, want):
    np.testing.assert_array_equal(got["exit_stage"], want["exit_stage"])
    np.testing.assert_array_equal(got["alive_counts"], want["alive_counts"])
    np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-4)
    for head, ref in zip(got["heads"], want["heads"]):
        np.testing.assert_allclose(head["canvas"], ref["canvas"], atol=1e-4)
        np.testing.assert_allclose(head["presence_logits"], ref["presence_logits"], atol=1e-4)
    # Label maps identical, except where two classes tie to float rounding.
    top2 = np.sort(want["scores"], axis=-1)[..., -2:]
    decided = top2[..., 1] - top2[..., 0] > 1e-5
    np.testing.assert_array_equal(
        got["scores"].argmax(-1)[decided], want["scores"].argmax(-1)[decided]
    )


@pytest.mark.parametrize(
    "mode, settings, ragged",
    [
        ("gathered", {}, True),  # TF, torch: ragged layout; JAX: packed
        ("gathered", {}, False),  # packed layout, exact capacities
        ("gathered", {"token_bucket": 8}, False),  # packed, padding rows and slots
        ("capacity", {"stage_capacity": 1.0}, True),
    ],
)
def test_pruned_modes_equal_the_masked_reference_on_a_mixed_batch(mode, settings, ragged):
    model = _mixed_model()
    # ragged: per-image attention where dynamic shapes allow it; else packed, exact capacities.
    model.execution_policy = ExecutionPolicy.for_backend(
        **({"per_image_attention": True} if ragged else {"dynamic_shapes": False, "token_bucket": 1})
    )
    images = random_images(4, 96, 96, seed=1)
    want = _run(model, images, "masked")
    assert want["alive_counts"][:, -1].tolist() == [36, 1, 11, 7]
    got = _run(model, images, mode, **settings)
    _assert_same_result(got, want)
    assert got["forced_exits"].sum() == 0


def test_padded_layout_path_at_batch_one_equals_masked():
    model = _mixed_model()
    images = random_images(1, 96, 96, seed=2)
    plan_exits(model, [[0.6, 0.25]])
    _assert_same_result(_run(model, images, "gathered"), _run(model, images, "masked"))


def test_batched_gathered_inference_equals_one_image_at_a_time():
    # The real grading rule, with p0 at the median confidence of the first
    # head so that images prune differently whatever the random weights.
    model = tiny_segmenter(tiny_backbone(image_size=(96, 96)), keep_top_k=2)
    images = random_images(4, 96, 96, seed=5)
    model.pruning_enabled = False
    first = to_numpy(model(images, training=False, return_details=True))["heads"][0]
    model.pruning_enabled = True
    model.prune_threshold = float(np.median(first["token_scores"].max(axis=1)))
    batched = _run(model, images, "gathered")
    assert len(set(batched["alive_counts"][:, -1].tolist())) > 1, "pick a p0 that prunes unevenly"
    for i in range(len(images)):
        single = to_numpy(model(images[i : i + 1], training=False, return_details=True))
        np.testing.assert_array_equal(single["exit_stage"][0], batched["exit_stage"][i])
        np.testing.assert_allclose(single["scores"][0], batched["scores"][i], atol=1e-4)


def test_every_image_pruned_to_one_token_still_runs():
    model = tiny_segmenter(prune_threshold=0.5)
    plan_exits(model, [[0.001, 0.001]] * 3)
    images = random_images(3, seed=4)
    for mode, settings in (("gathered", {}), ("capacity", {"stage_capacity": 1})):
        got = _run(model, images, mode, **settings)
        assert got["alive_counts"].tolist() == [[16, 1, 1]] * 3
        assert np.isfinite(got["scores"]).all()
    _assert_same_result(got, _run(model, images, "masked"))


def test_capacity_overflow_forces_exits_reports_and_warns():
    model = _mixed_model()
    images = random_images(4, 96, 96, seed=1)
    model.pruning_mode = "capacity"
    model.stage_capacity = (10, 5)
    with pytest.warns(UserWarning, match="forced to exit"):
        got = to_numpy(model(images, training=False, return_details=True))
    planned = np.array([[36, 36, 36], [36, 1, 1], [36, 18, 11], [36, 32, 7]])
    expected_alive = np.minimum(planned, [[36, 10, 5]])
    # Capacity applies after the planned exits; a forced exit is final.
    expected_alive[:, 2] = np.minimum(expected_alive[:, 1], expected_alive[:, 2])
    np.testing.assert_array_equal(got["alive_counts"], expected_alive)
    forced = got["forced_exits"]
    np.testing.assert_array_equal(forced[:, 0], planned[:, 1] - expected_alive[:, 1])
    assert forced[:, -1].tolist() == [0, 0, 0, 0]
    assert np.isfinite(got["scores"]).all()


def test_predict_and_evaluate_use_the_fast_mode_and_match_masked():
    model = _mixed_model()
    model.compile()
    images = random_images(4, 96, 96, seed=1)
    labels = np.random.default_rng(0).integers(0, 4, size=(4, 96, 96)).astype("int32")
    model.pruning_mode = "masked"
    want = model.predict(images, batch_size=4, verbose=0)
    want_logs = model.evaluate(images, labels, batch_size=4, verbose=0, return_dict=True)
    model.pruning_mode = "auto"
    assert model.inference_mode() == "gathered"
    got = model.predict(images, batch_size=4, verbose=0)
    got_logs = model.evaluate(images, labels, batch_size=4, verbose=0, return_dict=True)
    np.testing.assert_allclose(got, want, atol=1e-4)
    for key in ("loss", "miou", "gflops", "flops_saving", "alive_stage_2"):
        np.testing.assert_allclose(got_logs[key], want_logs[key], rtol=1e-4, atol=1e-5)
    counts = np.array([[36, 36, 36], [36, 1, 1], [36, 18, 11], [36, 32, 7]])
    flops = segmenter_flops(model, counts, (96, 96))
    dense = segmenter_flops(model, [[36] * 3], (96, 96))[0]
    np.testing.assert_allclose(got_logs["gflops"], flops.mean() / 1e9, rtol=1e-5)
    np.testing.assert_allclose(got_logs["flops_saving"], 1 - flops.mean() / dense, rtol=1e-4)
    assert got_logs["flops_saving"] > 0.1
    assert model.run_eagerly is False


@pytest.mark.parametrize("mode, settings", [("gathered", {}), ("capacity", {"stage_capacity": 1.0})])
def test_pruned_modes_inside_a_traced_program(mode, settings):
    # TF graphs inline the stages with dynamic capacities; a JAX trace cannot
    # read counts, so "gathered" falls back to the masked path there.
    model = _mixed_model()
    images = random_images(4, 96, 96, seed=1)
    want = _run(model, images, "masked")
    _run(model, images, mode, **settings)  # sets the mode
    got = to_numpy(traced(lambda x: model(x, training=False, return_details=True))(images))
    _assert_same_result(got, want)
    if mode == "capacity":
        np.testing.assert_allclose(model.predict(images, verbose=0), want["scores"], atol=1e-4)


def test_predict_details_reports_gflops_per_image():
    model = _mixed_model()
    details = model.predict_details(random_images(4, 96, 96, seed=1) * 50 + 128, batch_size=4)
    want = segmenter_flops(model, details["alive_counts"], (96, 96)) / 1e9
    np.testing.assert_allclose(details["gflops"], want)
    assert (details["gflops_with_auxiliary_heads"] > details["gflops"]).all()
    assert details["gflops"][1] < details["gflops"][0]


def test_mode_settings_are_validated_and_serialised():
    model = tiny_segmenter()
    with pytest.raises(ValueError, match="pruning_mode"):
        model.pruning_mode = "fast"
    with pytest.raises(ValueError, match="one entry per pruning head"):
        model.stage_capacity = (4, 4, 4)
    with pytest.raises(ValueError, match="fractions"):
        model.stage_capacity = 1.5
    with pytest.raises(ValueError, match=">= 1 token"):
        model.stage_capacity = 0
    with pytest.raises(ValueError, match="token_bucket"):
        model.token_bucket = 0
    model.pruning_mode = "capacity"
    with pytest.raises(ValueError, match="needs stage_capacity"):
        model(random_images(1), training=False)
    model.stage_capacity = (0.5, 4)
    model.token_bucket = 8
    config = model.get_config()
    restored = type(model).from_config(config)
    assert (restored.pruning_mode, restored.stage_capacity, restored.token_bucket) == (
        "capacity",
        (0.5, 4),
        8,
    )


def test_training_always_runs_masked():
    model = tiny_segmenter()
    for mode in ("auto", "gathered", "capacity"):
        model.pruning_mode = mode
        assert model.inference_mode(training=True) == "masked"
    model.pruning_enabled = False
    assert model.inference_mode() == "gathered"  # dense stages, no auxiliary heads


def test_prefix_tokens_run_every_layer_ungraded_in_every_mode():
    # A class token and two registers (P = 3) with LayerScale: every pruned
    # layout must give the masked reference's result, the heads grade the 36
    # patch tokens only, and the prefix tokens reach every alive token.
    backbone = tiny_backbone(
        image_size=(96, 96), class_token=True, num_register_tokens=2, layer_scale_init=0.5
    )
    assert backbone.num_prefix_tokens == 3
    model = tiny_segmenter(backbone, prune_threshold=0.5)
    plan_exits(model, MIXED_PLAN)
    images = random_images(4, 96, 96, seed=1)
    want = _run(model, images, "masked")
    assert want["alive_counts"][:, -1].tolist() == [36, 1, 11, 7]
    assert want["heads"][0]["mask_logits"].shape == (4, 4, 36)
    for mode, settings in (
        ("gathered", {}),
        ("capacity", {"stage_capacity": 1.0}),
        ("gathered", {"token_bucket": 8}),
    ):
        _assert_same_result(_run(model, images, mode, **settings), want)
    for per_image in (True, False):
        # Per-image attention (ragged) and batched attention on padded slots (packed).
        model.execution_policy = ExecutionPolicy.for_backend(per_image_attention=per_image)
        _assert_same_result(_run(model, images, "gathered", token_bucket=None), want)
    model.execution_policy = ExecutionPolicy.for_backend(dynamic_shapes=False)
    _assert_same_result(_run(model, images, "gathered"), want)
    traced_run = traced(lambda x: model(x, training=False, return_details=True))
    _assert_same_result(to_numpy(traced_run(images)), want)

    # Changing only the prefix tokens changes the last stage's predictions of
    # the image that kept a single token: it still attends to them. (Some class
    # logits of a random tiny head barely move; the largest change is the signal,
    # far above float32 noise.)
    table = backbone.patch_embedding.prefix_tokens
    shift = np.random.default_rng(0).normal(size=tuple(table.shape)).astype("float32")
    table.assign(table + shift)
    moved = _run(model, images, "gathered")
    last_alive = want["heads"][-1]["alive"][1]
    change = moved["heads"][-1]["mask_logits"][1] - want["heads"][-1]["mask_logits"][1]
    assert np.abs(change[:, last_alive]).max() > 1e-4
    counts = want["alive_counts"]
    no_prefix = tiny_segmenter(tiny_backbone(image_size=(96, 96)))
    assert (segmenter_flops(model, counts, (96, 96)) > segmenter_flops(no_prefix, counts, (96, 96))).all()


class _CompileCounter:
    """Counts JAX compilations while active (`jax.monitoring` events): backend
    compiles, and compile requests that the persistent cache (conftest) answers."""

    def __init__(self):
        import jax

        self.count, self.active = 0, False
        jax.monitoring.register_event_duration_secs_listener(lambda event, duration, **kw: self._listen(event))
        jax.monitoring.register_event_listener(lambda event, **kw: self._listen(event))

    def _listen(self, event):
        compiled = event in (
            "/jax/core/compile/backend_compile_duration",
            "/jax/compilation_cache/compile_requests_use_cache",
        )
        if self.active and compiled:
            self.count += 1


def test_second_predict_with_the_same_shapes_compiles_and_traces_nothing():
    model = _mixed_model()
    images = random_images(4, 96, 96, seed=1)
    counter = _CompileCounter() if keras.backend.backend() == "jax" else None
    if counter is not None:
        counter.active = True
    model.predict(images, batch_size=4, verbose=0)
    model.predict_on_batch(images[:1])
    traces = model.engine.trace_count
    if keras.backend.backend() != "torch":  # PyTorch runs eagerly: nothing is traced
        assert traces > 0
    if counter is not None:
        assert counter.count > 0  # the counter sees the first predict's compiles
        counter.count = 0
    again = model.predict(images, batch_size=4, verbose=0)
    model.predict_on_batch(images[:1])
    assert model.engine.trace_count == traces
    if counter is not None:
        assert counter.count == 0, f"{counter.count} JAX programs compiled on a repeated predict"
    assert again.shape == (4, 96, 96, 4)


def test_every_layer_is_built_so_keras_never_reruns_the_model_to_build_it():
    # JAX's test_on_batch/predict_on_batch run the whole model once more on
    # every call while any layer is unbuilt; the pruners have no state to build.
    model = _mixed_model()
    assert model.pruner.built
    assert tiny_segmenter().pruner.built


def test_settings_changed_anywhere_take_effect_on_the_next_call():
    model = _mixed_model()
    model.compile()
    images = random_images(4, 96, 96, seed=1)
    labels = np.zeros((4, 96, 96), "int32")
    pruned_logs = model.evaluate(images, labels, batch_size=4, verbose=0, return_dict=True)
    pruned = model.predict(images, batch_size=4, verbose=0)
    assert pruned_logs["flops_saving"] > 0.1
    model.pruner.prune_threshold = 1.0  # on the pruner itself, not the model's setter
    dense_logs = model.evaluate(images, labels, batch_size=4, verbose=0, return_dict=True)
    assert dense_logs["flops_saving"] == pytest.approx(0.0, abs=1e-6)
    assert model.predict_details(images)["alive_counts"].min() == 36
    model.pruner.keep_top_k = 0
    model.pruner.prune_threshold = 0.5
    again = model.evaluate(images, labels, batch_size=4, verbose=0, return_dict=True)
    np.testing.assert_allclose(again["flops_saving"], pruned_logs["flops_saving"], rtol=1e-5)
    np.testing.assert_allclose(model.predict(images, batch_size=4, verbose=0), pruned, atol=1e-5)
    assert model.run_eagerly is False


def test_predict_takes_lists_datasets_and_calls_callbacks():
    import tensorflow as tf

    model = _mixed_model()
    images = random_images(3, 96, 96, seed=1)
    want = model.predict(images, batch_size=2, verbose=0)

    class Count(keras.callbacks.Callback):
        batches = 0

        def on_predict_batch_end(self, batch, logs=None):
            Count.batches += 1
            assert logs["outputs"].shape[1:] == (96, 96, 4)

    got = model.predict(list(images), batch_size=2, verbose=0, callbacks=[Count()])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert Count.batches == 2
    dataset = tf.data.Dataset.from_tensor_slices((images, np.zeros((3, 96, 96), "int32"))).batch(2)
    np.testing.assert_allclose(model.predict(dataset, verbose=0), want, atol=1e-5)
    # (planned exits follow an image's place in its batch: same batches, same exits)
    np.testing.assert_allclose(model.predict(images, batch_size=2, steps=1, verbose=0), want[:2], atol=1e-5)


def test_dense_stages_measure_per_image_attention_once_and_match_batched():
    model = tiny_segmenter(tiny_backbone(image_size=(96, 96)), pruning_enabled=False)
    images = random_images(3, 96, 96, seed=2)
    auto = to_numpy(model(images, training=False))
    for per_image in (True, False):
        model.execution_policy = ExecutionPolicy.for_backend(per_image_attention=per_image)
        np.testing.assert_allclose(to_numpy(model(images, training=False)), auto, atol=1e-5)
    from keras_dtop.models import stage_runner

    measured = [key for key in stage_runner._ATTENTION_CHOICES if key[1:3] == (3, 36)]
    assert len(measured) == 1


def test_predict_records_no_autograd_graph():
    # Eager PyTorch would keep every activation for a backward pass (ViT-B at
    # batch 8 ran out of 24 GB); predict and predict_details run like Keras'
    # own predict step, without gradients. TensorFlow and JAX programs are functional.
    model = tiny_segmenter()
    states = []
    forward = model.engine.forward

    def recording(*args, **kwargs):
        if keras.backend.backend() == "torch":
            import torch

            states.append(torch.is_grad_enabled())
        else:
            states.append(False)
        return forward(*args, **kwargs)

    model.engine.forward = recording
    images = random_images(2)
    model.predict(images, verbose=0)
    model.predict_on_batch(images)
    model.predict_details(images)
    assert states == [False, False, False]
    if keras.backend.backend() == "torch":
        import torch

        assert torch.is_grad_enabled()  # restored afterwards
        assert model(images).requires_grad  # a direct call still differentiates
