"""everseg: semantic segmentation that keeps learning.

Start from a pretrained backbone, train on your images, evaluate honestly, predict.
The sub-packages follow the data flow: ``data`` -> ``models`` -> ``learn`` -> ``evaluate``.
"""

from everseg.data import (CAMVID_LABELS, DataError, LabelSpace, MaskMapping, SegmentationDataset,
                          check_dataset, load_camvid, load_folder, open_dataset)
# The sub-package ``everseg.evaluate`` keeps its name: its ``evaluate`` function is not
# re-exported here, since ``everseg.evaluate`` would then stop being the module.
from everseg.evaluate import ConfusionMatrix, SegmentationMetrics, predict
from everseg.learn import Plugin, RunConfig, Trainer, load_config, train
from everseg.models import Segmenter, create_model, load_model, save_model

__version__ = "0.1.0"

__all__ = [
    "CAMVID_LABELS", "ConfusionMatrix", "DataError", "LabelSpace", "MaskMapping", "Plugin", "RunConfig",
    "SegmentationDataset", "SegmentationMetrics", "Segmenter", "Trainer", "__version__", "check_dataset",
    "create_model", "load_camvid", "load_config", "load_folder", "load_model", "open_dataset",
    "predict", "save_model", "train",
]
