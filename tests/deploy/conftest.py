"""A small untrained CamVid-11 model saved once for the deployment tests."""

import pytest
import torch

from everseg.data import open_dataset
from everseg.models import create_model, save_model


@pytest.fixture(scope="package")
def model_dir(tiny_camvid, tmp_path_factory):
    train = open_dataset(tiny_camvid, dataset="folder", split="train")
    torch.manual_seed(0)
    model = create_model(arch="deeplabv3plus", backbone="mobilenet_v2", label_space=train.label_space,
                         pretrained=False, decoder_channels=32)
    return save_model(model, tmp_path_factory.mktemp("m") / "model")
