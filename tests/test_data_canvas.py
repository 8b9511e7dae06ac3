"""Scenes of object photographs (keras_dtop.data.canvas) and the IDX reader (fashion_mnist)."""

import gzip

import numpy as np
import pytest

from keras_dtop.data.canvas import compose_canvases
from keras_dtop.data.fashion_mnist import load_fashion_mnist, read_idx


def square_items():
    """Two 'photographs': a bright square (class 0) and a bright ring (class 1) on black."""
    items = np.zeros((2, 12, 12), np.uint8)
    items[0, 2:10, 2:10] = 200
    items[1, 1:11, 1:11] = 220
    items[1, 4:8, 4:8] = 0
    return items, np.array([0, 1])


def test_labels_are_the_item_class_where_the_item_is_and_background_elsewhere():
    items, classes = square_items()
    images, labels = compose_canvases(items, classes, 6, (40, 48), items_per_image=(1, 1), scale_range=(1, 1), seed=3)
    assert images.shape == (6, 40, 48, 3) and images.dtype == np.uint8
    assert labels.shape == (6, 40, 48) and labels.dtype == np.uint8
    for label in labels:
        values = set(np.unique(label))
        assert values <= {0, 1, 2} and len(values) == 2  # background + the one item
        item_class = max(values)
        rows, cols = np.nonzero(label == item_class)
        height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert (height, width) == ((8, 8) if item_class == 1 else (10, 10))
        if item_class == 2:  # the ring's hole shows the background
            assert label[rows.min() + 5, cols.min() + 5] == 0


def test_scenes_are_deterministic_and_items_stand_out():
    items, classes = square_items()
    first = compose_canvases(items, classes, 4, (32, 32), seed=1)
    again = compose_canvases(items, classes, 4, (32, 32), seed=1)
    other = compose_canvases(items, classes, 4, (32, 32), seed=2)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])
    with pytest.raises(ValueError, match="square grey images"):
        compose_canvases(np.zeros((2, 8, 9)), [0, 1], 1)


def test_idx_reader_and_missing_files(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 0x08, 3]) + b"".join(int(d).to_bytes(4, "big") for d in data.shape)
    with gzip.open(tmp_path / "x.gz", "wb") as f:
        f.write(header + data.tobytes())
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz"), data)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train", directory=tmp_path)
