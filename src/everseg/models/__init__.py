"""Segmentation models: pretrained backbone -> decoder -> 1x1 classifier.

>>> from everseg.models import create_model
>>> model = create_model(arch="deeplabv3plus", backbone="mobilenet_v2", num_classes=11)

Modules: ``backbones`` (feature extractors), ``decoders`` (DeepLabV3/V3+, LR-ASPP,
FCN, U-Net), ``segmenter`` (the model class and its config), ``factory``
(``create_model``), ``weights`` (finding ImageNet weights offline), ``saving``
(model folders).
"""

from everseg.models.backbones import BACKBONES
from everseg.models.decoders import ARCHITECTURES
from everseg.models.factory import create_model
from everseg.models.saving import load_model, save_model
from everseg.models.segmenter import ModelConfig, Segmenter
from everseg.models.weights import WeightsUnavailableError, resolve_pretrained_weights

__all__ = [
    "ARCHITECTURES",
    "BACKBONES",
    "ModelConfig",
    "Segmenter",
    "WeightsUnavailableError",
    "create_model",
    "load_model",
    "resolve_pretrained_weights",
    "save_model",
]
