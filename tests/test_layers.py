"""Layers: masked block vs gathered tokens, keras-hub weight layout, config round trips."""

import keras
import numpy as np
import pytest
from conftest import to_numpy

from keras_dtop.layers import (
    ClassTokenCrossAttention,
    DToPEncoderBlock,
    GradingDecoderLayer,
    GradingHead,
    PatchEmbedding,
    TokenPruner,
)
from keras_dtop.layers.patch_embedding import bicubic_resize_matrix


def tokens(batch=2, n=12, dim=32, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, n, dim)).astype("float32")


def test_masked_block_equals_block_on_gathered_tokens():
    block = DToPEncoderBlock(hidden_dim=32, num_heads=4, mlp_dim=64)
    x = tokens()
    keep = np.zeros((2, 12), bool)
    keep[0, [0, 3, 4, 9]] = True
    keep[1, :11] = True
    masked = to_numpy(block(x, keep_mask=keep))
    for b in range(2):
        gathered = to_numpy(block(x[b : b + 1, keep[b]]))[0]
        np.testing.assert_allclose(masked[b, keep[b]], gathered, atol=1e-5)
        np.testing.assert_array_equal(masked[b, ~keep[b]], 0.0)


def test_block_without_mask_equals_all_true_mask():
    block = DToPEncoderBlock(hidden_dim=32, num_heads=4, mlp_dim=64)
    x = tokens()
    np.testing.assert_allclose(
        to_numpy(block(x)), to_numpy(block(x, keep_mask=np.ones((2, 12), bool))), atol=1e-6
    )


def test_keras_hub_vit_block_weights_copy_one_to_one():
    from keras_hub.src.models.vit.vit_layers import ViTEncoderBlock

    hub = ViTEncoderBlock(num_heads=4, hidden_dim=32, mlp_dim=64)
    hub.build((None, 12, 32))
    for variable in hub.weights:  # non-trivial biases and norms
        variable.assign(0.2 * np.random.default_rng(len(variable.path)).normal(size=variable.shape))
    ours = DToPEncoderBlock(hidden_dim=32, num_heads=4, mlp_dim=64)
    ours.build((None, 12, 32))
    assert [tuple(w.shape) for w in ours.weights] == [tuple(w.shape) for w in hub.weights]
    ours.set_weights(hub.get_weights())
    x = tokens()
    np.testing.assert_allclose(to_numpy(ours(x)), to_numpy(hub(x)), atol=1e-5, rtol=1e-5)


def test_bicubic_resize_matches_torch():
    torch = pytest.importorskip("torch")
    grid = np.random.default_rng(0).normal(size=(5, 7, 3)).astype("float32")
    for out_h, out_w in [(5, 7), (8, 3), (12, 16), (2, 2)]:
        rows = to_numpy(bicubic_resize_matrix(out_h, 5))
        cols = to_numpy(bicubic_resize_matrix(out_w, 7))
        ours = np.einsum("ih,jw,hwd->ijd", rows, cols, grid)
        expected = torch.nn.functional.interpolate(
            torch.from_numpy(grid).permute(2, 0, 1)[None],
            size=(out_h, out_w),
            mode="bicubic",
            align_corners=False,
        )[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_patch_embedding_resizes_position_embeddings_to_any_grid():
    layer = PatchEmbedding(patch_size=8, hidden_dim=16, grid_size=(4, 4))
    images = np.random.default_rng(0).normal(size=(2, 32, 48, 3)).astype("float32")
    out = to_numpy(layer(images))
    assert out.shape == (2, 4 * 6, 16)
    conv = to_numpy(layer.projection(images)).reshape(2, 24, 16)
    pos = to_numpy(layer.position_embedding_for(4, 6)).reshape(24, 16)
    np.testing.assert_allclose(out, conv + pos, atol=1e-6)
    same = to_numpy(layer.position_embedding_for(4, 4))
    np.testing.assert_array_equal(same, to_numpy(layer.position_embedding))


@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, 32, 32), "rank 3"),
        ((2, 32, 32, 1), "3 image channels"),
        ((2, 36, 32, 3), "height must be a positive multiple of the patch size 8"),
        ((2, 32, 4, 3), "width must be a positive multiple"),
    ],
)
def test_patch_embedding_rejects_bad_images(shape, message):
    layer = PatchEmbedding(patch_size=8, hidden_dim=16, grid_size=(4, 4))
    with pytest.raises(ValueError, match=message):
        layer(np.zeros(shape, "float32"))


def run_layer(layer, inputs, kwargs):
    out = layer(*inputs, **kwargs)
    return to_numpy(out)


LAYER_CASES = [
    (
        lambda: DToPEncoderBlock(hidden_dim=32, num_heads=4, mlp_dim=64, drop_path_rate=0.1),
        lambda: (tokens(),),
        {"keep_mask": np.array([[True] * 6 + [False] * 6] * 2)},
    ),
    (
        lambda: GradingHead(num_classes=3, hidden_dim=16, num_heads=2, num_layers=2),
        lambda: (tokens(),),
        {"keep_mask": np.array([[True] * 5 + [False] * 7] * 2)},
    ),
    (
        lambda: GradingDecoderLayer(hidden_dim=16, num_heads=2),
        lambda: (tokens(n=3, dim=16), tokens(n=12, dim=16, seed=1)),
        {},
    ),
    (
        lambda: ClassTokenCrossAttention(hidden_dim=16, num_heads=4),
        lambda: (tokens(n=3, dim=16), tokens(n=12, dim=16, seed=1)),
        {},
    ),
    (
        lambda: PatchEmbedding(patch_size=8, hidden_dim=16, grid_size=(2, 3)),
        lambda: (np.random.default_rng(0).normal(size=(2, 16, 24, 3)).astype("float32"),),
        {},
    ),
]


@pytest.mark.parametrize("make, make_inputs, kwargs", LAYER_CASES)
def test_layer_config_round_trip(make, make_inputs, kwargs):
    layer = make()
    inputs = make_inputs()
    expected = run_layer(layer, inputs, kwargs)
    config = keras.saving.serialize_keras_object(layer)
    restored = keras.saving.deserialize_keras_object(config)
    assert type(restored) is type(layer)
    assert restored.get_config() == layer.get_config()
    run_layer(restored, inputs, kwargs)  # builds
    restored.set_weights(layer.get_weights())
    keras.tree.map_structure(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
        run_layer(restored, inputs, kwargs),
        expected,
    )


def test_token_pruner_serialises():
    layer = TokenPruner(prune_threshold=0.8, keep_top_k=3)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert (restored.prune_threshold, restored.keep_top_k) == (0.8, 3)


def test_head_ignores_pruned_tokens():
    head = GradingHead(num_classes=3, hidden_dim=16, num_heads=2, num_layers=2)
    x = tokens()
    keep = np.array([[True] * 5 + [False] * 7] * 2)
    noisy = x.copy()
    noisy[:, 5:] = 100.0
    a = to_numpy(head(x, keep_mask=keep))
    b = to_numpy(head(noisy, keep_mask=keep))
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)
    np.testing.assert_allclose(a[1], b[1], atol=1e-5)
    np.testing.assert_array_equal(a[1][:, :, 5:], 0.0)


def test_heads_and_dims_must_divide():
    with pytest.raises(ValueError, match="divisible"):
        DToPEncoderBlock(hidden_dim=30, num_heads=4, mlp_dim=64)
    with pytest.raises(ValueError, match="divisible"):
        GradingHead(num_classes=3, hidden_dim=15, num_heads=2)
