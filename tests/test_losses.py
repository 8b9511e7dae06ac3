"""The DToP loss against a hand computation, and its options."""

import numpy as np
from conftest import to_numpy

from keras_dtop.losses import DToPLoss, upsample_canvas


def bilinear(grid, size):
    """Half-pixel bilinear resize of a (h, w) array to `size`, edges clamped (NumPy)."""

    def axis_weights(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = src - lo
        m = np.zeros((n_out, n_in))
        m[np.arange(n_out), lo] += 1 - frac
        m[np.arange(n_out), hi] += frac
        return m

    rows = axis_weights(grid.shape[0], size[0])
    cols = axis_weights(grid.shape[1], size[1])
    return rows @ grid @ cols.T


def hand_loss(presence, canvas, labels, grid, exclude_ignored=False):
    """Presence CE (no-object 0.1) + 20·focal + dice, written out for one head."""
    batch, classes, _ = canvas.shape
    present = np.array([[np.any(labels[b] == c) for c in range(classes)] for b in range(batch)])
    log_p = presence - np.log(np.exp(presence).sum(-1, keepdims=True))
    weights = np.where(present, 1.0, 0.1)
    ce = -np.where(present, log_p[..., 0], log_p[..., 1])
    ce = (weights * ce).sum() / weights.sum()
    focal = dice = 0.0
    for b in range(batch):
        valid = labels[b] != 255 if exclude_ignored else np.ones(labels[b].shape, bool)
        for c in range(classes):
            if not present[b, c]:
                continue
            logit = bilinear(canvas[b, c].reshape(grid), labels[b].shape)
            p = 1 / (1 + np.exp(-logit))
            t = (labels[b] == c).astype(float)
            bce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
            p_t = p * t + (1 - p) * (1 - t)
            a_t = 0.25 * t + 0.75 * (1 - t)
            focal += (a_t * bce * (1 - p_t) ** 2)[valid].mean()
            pv, tv = p[valid], t[valid]
            dice += 1 - (2 * (pv * tv).sum() + 1) / (pv.sum() + tv.sum() + 1)
    num_masks = max(present.sum(), 1)
    return ce + (20 * focal + dice) / num_masks


def tiny_case():
    rng = np.random.default_rng(0)
    presence = rng.normal(size=(2, 4, 2)).astype("float32")
    canvas = rng.normal(size=(2, 4, 6), scale=2.0).astype("float32")  # 2x3 token grid
    labels = np.zeros((2, 4, 6), "int32")
    labels[0, :2, :3] = 2
    labels[0, 3, :] = 255
    labels[1] = 1
    labels[1, 0, 0] = 255
    labels[1, 2:, 4:] = 0  # class 3 absent everywhere; class 2 absent in image 1
    return presence, canvas, labels


def test_upsample_canvas_matches_bilinear():
    _, canvas, _ = tiny_case()
    ours = to_numpy(upsample_canvas(canvas, (2, 3), (4, 6)))
    for b in range(2):
        for c in range(4):
            expected = bilinear(canvas[b, c].reshape(2, 3), (4, 6))
            np.testing.assert_allclose(ours[b, :, :, c], expected, atol=1e-5)


def test_loss_equals_hand_computation():
    presence, canvas, labels = tiny_case()
    heads = [{"presence_logits": presence, "canvas": canvas}]
    ours = float(to_numpy(DToPLoss().stage_losses(heads, labels, (2, 3))[0]))
    np.testing.assert_allclose(ours, hand_loss(presence, canvas, labels, (2, 3)), rtol=1e-5)


def test_loss_can_exclude_ignored_pixels():
    presence, canvas, labels = tiny_case()
    heads = [{"presence_logits": presence, "canvas": canvas}]
    loss = DToPLoss(exclude_ignored_pixels=True)
    ours = float(to_numpy(loss.stage_losses(heads, labels, (2, 3))[0]))
    expected = hand_loss(presence, canvas, labels, (2, 3), exclude_ignored=True)
    np.testing.assert_allclose(ours, expected, rtol=1e-5)
    default = float(to_numpy(DToPLoss().stage_losses(heads, labels, (2, 3))[0]))
    assert abs(default - ours) > 1e-4


def test_one_loss_per_head():
    presence, canvas, labels = tiny_case()
    heads = [
        {"presence_logits": presence, "canvas": canvas},
        {"presence_logits": presence * 0.5, "canvas": canvas[:, :, ::-1]},
    ]
    losses = [float(v) for v in to_numpy(DToPLoss().stage_losses(heads, labels, (2, 3)))]
    assert len(losses) == 2 and losses[0] != losses[1]
    np.testing.assert_allclose(
        losses[1], hand_loss(presence * 0.5, canvas[:, :, ::-1], labels, (2, 3)), rtol=1e-5
    )
