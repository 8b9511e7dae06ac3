"""DToPAdamW's head learning rate, the warm-up/poly schedule, and the FLOP count."""

import keras
import numpy as np
import pytest
from conftest import to_numpy

from keras_dtop.flops import dtop_flops, segmenter_flops
from keras_dtop.optimizers import DToPAdamW, WarmupPolyDecay


def test_heads_move_ten_times_faster():
    head = keras.Variable(np.ones((3,), "float32"), name="kernel")
    body = keras.Variable(np.ones((3,), "float32"), name="kernel")
    # Paths decide what is a head; fake them the way a model would name them.
    head._path, body._path = "segmenter/grading_head_0/kernel", "segmenter/encoder/kernel"
    optimizer = DToPAdamW(learning_rate=1e-3, weight_decay=0.0)
    optimizer.build([head, body])
    grads = [np.full((3,), 0.5, "float32")] * 2
    optimizer.apply(grads, [head, body])
    head_step = 1.0 - to_numpy(head)
    body_step = 1.0 - to_numpy(body)
    np.testing.assert_allclose(body_step, 1e-3, rtol=1e-3)
    np.testing.assert_allclose(head_step, 1e-2, rtol=1e-3)


def test_decoupled_weight_decay_uses_the_scaled_rate():
    head = keras.Variable(np.ones((2,), "float32"))
    head._path = "m/grading_head_1/bias"
    optimizer = DToPAdamW(learning_rate=1e-3, weight_decay=0.5)
    optimizer.build([head])
    optimizer.apply([np.zeros((2,), "float32")], [head])
    np.testing.assert_allclose(to_numpy(head), 1.0 - 1e-2 * 0.5, rtol=1e-6)


def test_optimizer_config_round_trip():
    optimizer = DToPAdamW(learning_rate=WarmupPolyDecay(2e-5, 100, 10), head_lr_multiplier=5)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(restored, DToPAdamW) and restored.head_lr_multiplier == 5.0
    assert isinstance(restored._learning_rate, WarmupPolyDecay)


def test_warmup_poly_schedule():
    schedule = WarmupPolyDecay(1.0, decay_steps=110, warmup_steps=10, power=0.9)
    value = lambda step: float(to_numpy(schedule(step)))  # noqa: E731
    assert value(0) == pytest.approx(1e-6)
    assert value(5) == pytest.approx(0.5, rel=1e-4)
    assert value(10) == pytest.approx(1.0)
    assert value(60) == pytest.approx(0.5**0.9, rel=1e-5)
    assert value(110) == pytest.approx(0.0, abs=1e-7)
    assert value(500) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="decay_steps"):
        WarmupPolyDecay(1.0, decay_steps=10, warmup_steps=10)


def test_flops_match_the_reconstructed_baselines():
    """Design doc §5.2: dense ViT-B/16 512 (150 classes) and ViT-L/16 640."""
    base = dtop_flops([[1024] * 3], (512, 512), 16, 768, 12, (5, 7, 11), 150, 384)
    large = dtop_flops([[1600] * 3], (640, 640), 16, 1024, 24, (7, 15, 23), 150, 512)
    assert base[0] / 1e9 == pytest.approx(109.652, rel=1e-3)
    assert large[0] / 1e9 == pytest.approx(616.662, rel=1e-3)
    full = dtop_flops([[1024] * 3], (512, 512), 16, 768, 12, (5, 7, 11), 150, 384, include_auxiliary_heads=True)
    assert full[0] / 1e9 == pytest.approx(114.643, rel=1e-3)


def test_flops_follow_the_alive_pattern_by_hand():
    # 2 layers of width 4, patch 2 on 4x4 (N = 4), 1 class, head width 2, 1 decoder layer.
    counts = [[4, 1]]
    got = dtop_flops(counts, (4, 4), 2, 4, 2, (0, 1), 1, 2, head_num_layers=1)[0]
    layer = lambda n: 12 * n * 16 + 2 * n * n * 4 + 10 * n * 4  # noqa: E731
    head = lambda n: n * 4 * 2 + 5 * n * 2 + (14 * 4 + 2 * n * 4 + 2 * n * 2 + 15 * 2) + 2 * 2  # noqa: E731
    expected = 3 * 4 * 4 * 4 + layer(4) + layer(1) + head(1) + 4 * 16
    assert got == pytest.approx(expected)


def test_segmenter_flops_reads_the_model():
    from conftest import tiny_segmenter

    model = tiny_segmenter()
    counts = np.array([[16, 16, 16], [16, 8, 3]])
    flops = segmenter_flops(model, counts, (64, 64))
    assert flops[1] < flops[0]
    np.testing.assert_allclose(
        flops,
        dtop_flops(counts, (64, 64), 16, 32, 4, (1, 2, 3), 4, 16, mlp_ratio=2.0, head_num_layers=2),
    )


def test_flops_of_backend_tensors_equal_the_host_count():
    # evaluate() counts FLOPs from alive counts inside a compiled step.
    counts = np.array([[1024, 700, 512], [1024, 1024, 1024]], dtype="int32")
    host = dtop_flops(counts, (512, 512), 16, 768, 12, (5, 7, 11), 150, 384)
    tensor = dtop_flops(keras.ops.convert_to_tensor(counts), (512, 512), 16, 768, 12, (5, 7, 11), 150, 384)
    np.testing.assert_allclose(to_numpy(tensor), host, rtol=1e-6)
    assert host[0] < host[1]
