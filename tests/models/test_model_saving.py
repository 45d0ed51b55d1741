"""Model folders: what save_model writes, atomic replacement, and clear errors on bad folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from everseg.data.labelspace import LabelSpace
from everseg.models import create_model, load_model, save_model
from everseg.models import saving as saving_module


@pytest.fixture
def model():
    torch.manual_seed(0)
    labels = LabelSpace(names=("sky", "road", "car"))
    return create_model(arch="lraspp", backbone="timm:mobilenetv3_small_050", label_space=labels,
                        pretrained=False).eval()


def _same_outputs(a, b) -> bool:
    x = torch.rand(1, 3, 33, 47, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def test_folder_layout_and_config_contents(model, tmp_path: Path) -> None:
    model.metadata = {"epochs": 3, "dataset": "camvid", "miou": 0.61}
    out = save_model(model, tmp_path / "run" / "model")
    assert out == tmp_path / "run" / "model"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    payload = json.loads((out / "config.json").read_text())
    assert payload["config"] == model.config.to_dict()
    assert payload["label_space"]["names"] == ["sky", "road", "car"]
    assert payload["metadata"] == {"epochs": 3, "dataset": "camvid", "miou": 0.61}
    assert isinstance(payload["everseg_version"], str) and payload["everseg_version"]

    loaded = load_model(out)
    assert loaded.metadata == model.metadata
    assert loaded.label_space == model.label_space
    assert _same_outputs(model, loaded)


def test_replacing_a_saved_model_leaves_no_temporary_files(model, tmp_path: Path) -> None:
    target = tmp_path / "model"
    save_model(model, target)
    model.reset_classifier(5)
    save_model(model, target)
    assert load_model(target).num_classes == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_failed_save_keeps_the_previous_model(model, tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "model"
    save_model(model, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", explode)
    model.reset_classifier(7)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_swap_failure_restores_the_previous_model(model, tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "model"
    save_model(model, target)
    before = (target / "config.json").read_text()
    real_replace = saving_module.os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # moving the new folder into place
            raise OSError("interrupted")
        return real_replace(src, dst)

    monkeypatch.setattr(saving_module.os, "replace", flaky_replace)
    model.reset_classifier(4)
    with pytest.raises(OSError, match="interrupted"):
        save_model(model, target)
    assert (target / "config.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_refuses_to_replace_a_folder_with_other_files(model, tmp_path: Path) -> None:
    target = tmp_path / "results"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt"):
        save_model(model, target)
    assert (target / "notes.txt").read_text() == "keep me"


def test_metadata_must_be_json(model, tmp_path: Path) -> None:
    model.metadata = {"when": object()}
    with pytest.raises(ValueError, match="JSON"):
        save_model(model, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_channels_last_bf16_model_saves(model, tmp_path: Path) -> None:
    model.to(memory_format=torch.channels_last)
    save_model(model, tmp_path / "model")
    assert _same_outputs(model.to(memory_format=torch.contiguous_format), load_model(tmp_path / "model"))


# ------------------------------------------------------------------ bad folders


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        load_model(tmp_path / "nowhere")


def test_folder_without_config(model, tmp_path: Path) -> None:
    save_model(model, tmp_path / "model")
    (tmp_path / "model" / "config.json").unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_model(tmp_path / "model")
    assert str(tmp_path / "model") in str(info.value) and "config.json" in str(info.value)


def test_corrupt_config(model, tmp_path: Path) -> None:
    save_model(model, tmp_path / "model")
    (tmp_path / "model" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path / "model")


def test_config_for_unknown_architecture(model, tmp_path: Path) -> None:
    save_model(model, tmp_path / "model")
    path = tmp_path / "model" / "config.json"
    payload = json.loads(path.read_text())
    payload["config"]["arch"] = "segformer"
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="segformer"):
        load_model(tmp_path / "model")


def test_missing_weights(model, tmp_path: Path) -> None:
    save_model(model, tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(tmp_path / "model")


def test_corrupt_weights(model, tmp_path: Path) -> None:
    save_model(model, tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError) as info:
        load_model(tmp_path / "model")
    assert str(weights) in str(info.value)


def test_weights_of_another_architecture(model, tmp_path: Path) -> None:
    save_model(model, tmp_path / "a")
    other = create_model(arch="fcn", backbone="timm:mobilenetv3_small_050", num_classes=3, pretrained=False)
    save_model(other, tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").replace(tmp_path / "a" / "model.safetensors")
    with pytest.raises(ValueError, match="does not fit"):
        load_model(tmp_path / "a")


def test_a_model_saved_again_replaces_the_memory_stored_with_it(model, tmp_path: Path) -> None:
    """Rerunning a scenario into the same folder: the old model's replay memory goes with it."""
    target = tmp_path / "model"
    save_model(model, target)
    (target / "memory").mkdir()
    (target / "memory" / "memory.json").write_text("{}")
    save_model(model, target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
