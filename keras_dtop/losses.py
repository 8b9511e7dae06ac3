"""The DToP training loss (design doc §4.2), per grading head, summed over heads.

Per head j, with the crop's present classes as targets (255 = ignore):
  presence: 2-way cross-entropy over all batch·classes queries, class weights
            present 1 / no-object `no_object_weight` (0.1), weighted mean;
  masks:    the canvas (each token's logits from its last head), upsampled
            bilinearly to the label size, against 1[label == c] for the
            present classes only: sigmoid focal (alpha 0.25, gamma 2; mean over
            pixels) x20 and dice on the sigmoid (+1 smoothing) x1, both summed
            over masks and divided by the number of present masks in the batch.
255 pixels are negatives for every class in the mask losses (the authors'
code) unless `exclude_ignored_pixels=True`.
"""

import keras
from keras import ops

from keras_dtop.data.labels import IGNORE_INDEX
from keras_dtop.distribute.replicas import cross_replica_sum


def present_classes(labels, num_classes):
    """Float `(batch, classes)`: 1 where class c occurs in the image (255 ignored)."""
    classes = ops.arange(num_classes, dtype="int32")
    flat = ops.reshape(ops.cast(labels, "int32"), (ops.shape(labels)[0], -1))
    return ops.cast(ops.any(flat[:, None, :] == classes[None, :, None], axis=-1), "float32")


def presence_loss(presence_logits, present, no_object_weight=0.1):
    """Weighted 2-way cross-entropy; target 0 = present, 1 = no-object.

    The weight sum covers the global batch under data parallelism
    (`cross_replica_sum`), so each replica returns its share.
    """
    log_probs = ops.log_softmax(ops.cast(presence_logits, "float32"), axis=-1)
    nll = -(present * log_probs[..., 0] + (1.0 - present) * log_probs[..., 1])
    weight = present + (1.0 - present) * no_object_weight
    return ops.sum(weight * nll) / cross_replica_sum(ops.sum(weight))


def upsample_canvas(canvas, grid, size):
    """`(batch, classes, tokens)` logits -> `(batch, H, W, classes)` by bilinear resizing."""
    batch, num_classes = ops.shape(canvas)[0], ops.shape(canvas)[1]
    maps = ops.reshape(ops.transpose(canvas, (0, 2, 1)), (batch, grid[0], grid[1], num_classes))
    return ops.image.resize(maps, size, interpolation="bilinear", antialias=False)


def mask_losses(mask_logits, labels, present, alpha=0.25, gamma=2.0, exclude_ignored_pixels=False):
    """Sigmoid focal and dice sums over present masks.

    mask_logits: `(batch, H, W, classes)` at label resolution; labels `(batch, H, W)`;
    present `(batch, classes)`. Returns `(focal_sum, dice_sum)`: per-mask focal
    (mean over pixels) and dice summed over the present masks.
    """
    logits = ops.cast(mask_logits, "float32")
    labels = ops.cast(labels, "int32")
    classes = ops.arange(ops.shape(logits)[-1], dtype="int32")
    target = ops.cast(labels[..., None] == classes, "float32")  # (B, H, W, C)
    if exclude_ignored_pixels:
        valid = ops.cast(labels != IGNORE_INDEX, "float32")[..., None]
    else:
        valid = ops.ones_like(target[..., :1])
    prob = ops.sigmoid(logits)
    ce = ops.maximum(logits, 0.0) - logits * target + ops.log1p(ops.exp(-ops.abs(logits)))
    p_t = prob * target + (1.0 - prob) * (1.0 - target)
    alpha_t = alpha * target + (1.0 - alpha) * (1.0 - target)
    focal = alpha_t * ce * (1.0 - p_t) ** gamma * valid
    pixels = ops.maximum(ops.sum(valid, axis=(1, 2)), 1.0)  # (B, 1)
    focal_per_mask = ops.sum(focal, axis=(1, 2)) / pixels  # (B, C)
    prob = prob * valid
    target = target * valid
    numerator = 2.0 * ops.sum(prob * target, axis=(1, 2))
    denominator = ops.sum(prob, axis=(1, 2)) + ops.sum(target, axis=(1, 2))
    dice_per_mask = 1.0 - (numerator + 1.0) / (denominator + 1.0)
    return ops.sum(focal_per_mask * present), ops.sum(dice_per_mask * present)


@keras.saving.register_keras_serializable(package="keras_dtop")
class DToPLoss:
    """Per-head DToP loss. Call with the model's training outputs and labels.

    Args:
        no_object_weight: weight of the no-object class in the presence loss.
        focal_weight, dice_weight, presence_weight: term weights (20, 1, 1).
        exclude_ignored_pixels: leave 255 pixels out of the mask losses
            (the authors count them as negatives for every class).
    """

    def __init__(
        self,
        no_object_weight=0.1,
        presence_weight=1.0,
        focal_weight=20.0,
        dice_weight=1.0,
        exclude_ignored_pixels=False,
    ):
        self.no_object_weight = float(no_object_weight)
        self.presence_weight = float(presence_weight)
        self.focal_weight = float(focal_weight)
        self.dice_weight = float(dice_weight)
        self.exclude_ignored_pixels = bool(exclude_ignored_pixels)

    def stage_losses(self, heads, labels, grid):
        """One scalar per head: `presence + 20·focal + dice`.

        heads: list of dicts with `presence_logits (batch, classes, 2)` and
        `canvas (batch, classes, tokens)`; labels `(batch, H, W)` ints; grid (h, w).
        """
        num_classes = heads[0]["presence_logits"].shape[1]
        present = present_classes(labels, num_classes)
        # Masks of the global batch: each data-parallel replica returns its share.
        num_masks = ops.maximum(cross_replica_sum(ops.sum(present)), 1.0)
        size = (ops.shape(labels)[1], ops.shape(labels)[2])
        losses = []
        for head in heads:
            ce = presence_loss(head["presence_logits"], present, self.no_object_weight)
            masks = upsample_canvas(head["canvas"], grid, size)
            focal, dice = mask_losses(
                masks, labels, present, exclude_ignored_pixels=self.exclude_ignored_pixels
            )
            losses.append(
                self.presence_weight * ce
                + (self.focal_weight * focal + self.dice_weight * dice) / num_masks
            )
        return losses

    def get_config(self):
        return dict(
            no_object_weight=self.no_object_weight,
            presence_weight=self.presence_weight,
            focal_weight=self.focal_weight,
            dice_weight=self.dice_weight,
            exclude_ignored_pixels=self.exclude_ignored_pixels,
        )

    @classmethod
    def from_config(cls, config):
        return cls(**config)
