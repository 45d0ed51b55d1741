"""Reading segmentation datasets: readers, the label space, masks and joint transforms.

``open_dataset(root)`` reads any supported layout (CamVid, Pascal VOC, Cityscapes,
ADE20K or a plain images/ + masks/ folder) into a :class:`SegmentationDataset`;
``check_dataset(root)`` decodes everything once and reports what is there and what
is wrong.
"""

from everseg.data.ade20k import ADE20K_CLASSES, ADE20K_LABELS, load_ade20k
from everseg.data.camvid import CAMVID_LABELS, load_camvid
from everseg.data.check import CheckReport, check_dataset, print_report
from everseg.data.cityscapes import CITYSCAPES_LABELS, load_cityscapes
from everseg.data.dataset import Sample, SegmentationDataset
from everseg.data.errors import DataError, DataProblems
from everseg.data.fetch import FetchError, fetch_dataset
from everseg.data.folder import load_folder
from everseg.data.io import read_image, read_mask
from everseg.data.labelspace import IGNORE_INDEX, LabelSpace
from everseg.data.masks import MaskMapping
from everseg.data.open import DATASET_READERS, available_splits, detect_dataset, open_dataset
from everseg.data.protocols import PROTOCOLS, get_protocol
from everseg.data.scenarios import Scenario, ScenarioSpec, Step, StepSpec, build_scenario
from everseg.data.transforms import AugmentConfig, resize_transform, train_transform
from everseg.data.voc import VOC_LABELS, load_voc

__all__ = [
    "LabelSpace",
    "IGNORE_INDEX",
    "DataError",
    "DataProblems",
    "Sample",
    "SegmentationDataset",
    "MaskMapping",
    "read_image",
    "read_mask",
    "AugmentConfig",
    "train_transform",
    "resize_transform",
    "load_camvid",
    "CAMVID_LABELS",
    "load_folder",
    "load_voc",
    "VOC_LABELS",
    "load_cityscapes",
    "CITYSCAPES_LABELS",
    "load_ade20k",
    "ADE20K_CLASSES",
    "ADE20K_LABELS",
    "open_dataset",
    "detect_dataset",
    "available_splits",
    "DATASET_READERS",
    "check_dataset",
    "CheckReport",
    "print_report",
    "fetch_dataset",
    "FetchError",
    "PROTOCOLS",
    "get_protocol",
    "Scenario",
    "ScenarioSpec",
    "Step",
    "StepSpec",
    "build_scenario",
]
