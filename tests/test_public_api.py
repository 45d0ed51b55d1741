import importlib
import types

import pytest

import everseg


@pytest.mark.parametrize("name", ["everseg", "everseg.data", "everseg.models", "everseg.learn", "everseg.evaluate"])
def test_all_names_exist(name):
    module = importlib.import_module(name)
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing


def test_subpackages_are_not_shadowed():
    for sub in ("data", "models", "learn", "evaluate"):
        assert isinstance(getattr(everseg, sub), types.ModuleType), sub


def test_embedded_sample_is_complete():
    from everseg.data import open_dataset
    from everseg.samples import camvid_mini

    train = open_dataset(camvid_mini(), split="train")
    test = open_dataset(camvid_mini(), split="test")
    assert (len(train), len(test)) == (60, 20)
    assert train.label_space.names[3] == "Road" and train.label_space.palette[3] == (128, 64, 128)
