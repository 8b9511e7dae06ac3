"""Checkpoint files -> state dicts -> models (keras_dtop.convert.checkpoints)."""

import argparse

import numpy as np
import pytest
from conftest import load_fixture, to_numpy
from test_authors_parity import nhwc, state_dict

from keras_dtop.convert import read_state_dict, segmenter_from_authors_checkpoint, segmenter_from_authors_state_dict


@pytest.fixture(scope="module")
def reference():
    ref = load_fixture("reference_p0.7.npz")
    return state_dict(ref), nhwc(ref)


def test_authors_pth_file_as_mmsegmentation_writes_it(reference, tmp_path):
    torch = pytest.importorskip("torch")
    weights, images = reference
    wrapped = {"meta": {"epoch": 3, "iter": 40000}, "state_dict": {f"module.{k}": torch.from_numpy(v) for k, v in weights.items()}}
    torch.save(wrapped, tmp_path / "dtop.pth")
    np.savez(tmp_path / "dtop.npz", **weights)
    expected = segmenter_from_authors_state_dict(weights, 3, 3, prune_threshold=0.7, keep_top_k=5)(images)
    for name in ("dtop.pth", "dtop.npz"):
        model = segmenter_from_authors_checkpoint(tmp_path / name, num_heads=3, head_num_heads=3, prune_threshold=0.7, keep_top_k=5)
        np.testing.assert_allclose(to_numpy(model(images)), to_numpy(expected), atol=1e-6)
    loaded = read_state_dict(tmp_path / "dtop.pth")
    assert set(loaded) == set(weights)


def test_checkpoint_errors_name_the_problem(reference, tmp_path):
    torch = pytest.importorskip("torch")
    weights, _ = reference
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        read_state_dict(tmp_path / "missing.pth")
    (tmp_path / "weights.h5").write_bytes(b"")
    with pytest.raises(ValueError, match="Unknown checkpoint format '.h5'"):
        read_state_dict(tmp_path / "weights.h5")
    # mmcv-era checkpoints carry config objects in "meta"; Namespace stands for them.
    torch.save({"state_dict": {"a": torch.zeros(2)}, "meta": argparse.Namespace(lr=0.1)}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="trusted=True"):
        read_state_dict(tmp_path / "pickled.pth")
    assert list(read_state_dict(tmp_path / "pickled.pth", trusted=True)) == ["a"]
    broken = dict(weights)
    broken.pop("decode_head.q.weight")
    broken["backbone.extra.weight"] = np.zeros(3, "float32")
    broken["backbone.layers.0.ln1.weight"] = np.zeros(5, "float32")
    np.savez(tmp_path / "broken.npz", **broken)
    with pytest.raises((ValueError, KeyError)) as error:
        segmenter_from_authors_checkpoint(tmp_path / "broken.npz", num_heads=3, head_num_heads=3)
    assert "decode_head.q.weight" in str(error.value)
