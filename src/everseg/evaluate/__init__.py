"""Measuring segmentation models: confusion matrix, scores, inference, reports, plots.

>>> from everseg.evaluate import evaluate, print_metrics_table
>>> result = evaluate(model, test_set, mode="slide", crop_size=512)
>>> print_metrics_table(result.metrics, result.label_space)
"""

from everseg.evaluate.confusion import ConfusionMatrix
from everseg.evaluate.continual import ContinualReport, StepRecord
from everseg.evaluate.inference import (
    EvaluationResult,
    evaluate,
    predict,
    predict_logits,
    predict_probabilities,
)
from everseg.evaluate.metrics import SegmentationMetrics
from everseg.evaluate.plots import (
    colorize,
    overlay,
    plot_confusion_matrix,
    plot_per_class_iou,
    save_comparison,
    with_legend,
)
from everseg.evaluate.tiled import predict_image
from everseg.evaluate.report import (
    metrics_markdown,
    print_metrics_table,
    write_metrics_json,
)

__all__ = [
    "ConfusionMatrix",
    "ContinualReport",
    "EvaluationResult",
    "SegmentationMetrics",
    "StepRecord",
    "colorize",
    "evaluate",
    "metrics_markdown",
    "overlay",
    "plot_confusion_matrix",
    "plot_per_class_iou",
    "predict",
    "predict_image",
    "predict_logits",
    "predict_probabilities",
    "print_metrics_table",
    "save_comparison",
    "with_legend",
    "write_metrics_json",
]
