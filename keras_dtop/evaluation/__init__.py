"""Evaluation: sliding-window inference and the accuracy/cost report."""

from keras_dtop.evaluation.report import (
    EvaluationReport,
    confusion_matrix,
    evaluate_segmentation,
    iou_from_confusion,
)
from keras_dtop.evaluation.threshold_budget import ThresholdChoice, choose_prune_threshold
from keras_dtop.evaluation.sliding_window import (
    SlidingWindow,
    pad_pixel,
    sliding_window_batch,
    sliding_window_details,
    window_positions,
)
