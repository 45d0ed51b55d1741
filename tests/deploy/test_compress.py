"""Pruning, distillation into a student, and the models they make: ordinary everseg models."""

import json

import pytest
import torch

from everseg.data import open_dataset
from everseg.deploy.distill import TeacherDistillation, channel_kl, compress_model, distill_model, pixel_kl
from everseg.deploy.prune import count_macs, prune_channels
from everseg.learn import load_config
from everseg.learn.trainer import read_history
from everseg.models import load_model, save_model
from everseg.workflows import export_model, load_trained_model

TINY = {"data.crop_size": [48, 64], "data.val_split": "test", "model.pretrained": False,
        "train.batch_size": 4, "train.bf16": "off", "train.epochs": 1, "train.seed": 0}


@pytest.fixture
def teacher_dir(model_dir):
    return model_dir


def _cfg(data, **more):
    return load_config(None, {**TINY, "data.path": str(data), **more})


def test_the_distillation_terms_are_kl_divergences():
    torch.manual_seed(0)
    t, s = torch.randn(2, 5, 6, 7), torch.randn(2, 5, 6, 7, requires_grad=True)
    assert pixel_kl(t, t, 2.0).abs() < 1e-6 and channel_kl(t, t).abs() < 1e-6
    q, log_p = (t / 2).softmax(1), (s / 2).log_softmax(1)
    expected = (q * (q.log() - log_p)).sum(1).mean() * 4
    assert torch.allclose(pixel_kl(s, t, 2.0), expected, atol=1e-6)
    loss = pixel_kl(s, t) + channel_kl(s, t)
    assert loss > 0
    loss.backward()
    assert s.grad.abs().sum() > 0
    # The channel term compares where each class lies, not each pixel's mixture: a map shifted
    # in space has the same pixel histogram but another spatial distribution.
    shifted = t.roll(3, dims=-1)
    assert channel_kl(shifted, t) > 0.01


def test_pruning_removes_channels_and_the_saved_model_loads_back(teacher_dir, tmp_path):
    model = load_model(teacher_dir)
    before = count_macs(model, (64, 80))
    x = torch.rand(1, 3, 64, 80)
    prune_channels(model, 0.5)
    after = count_macs(model, (64, 80))
    assert after < 0.45 * before
    assert 0.45 < model.config.pruned < 0.55 and model.classifier.out_channels == 11
    assert model.decoder.out_channels == model.classifier.in_channels < 32
    with torch.no_grad():
        y = model.eval()(x)
    save_model(model, tmp_path / "pruned")
    assert json.loads((tmp_path / "pruned" / "config.json").read_text())["config"]["pruned"] == model.config.pruned
    again = load_model(tmp_path / "pruned")
    with torch.no_grad():
        assert torch.equal(again(x), y)
    assert again.backbone.channels == model.backbone.channels
    # It keeps learning: new classes grow its (narrower) classifier.
    from everseg.data.labelspace import LabelSpace

    again.grow_classifier(LabelSpace(names=(*again.label_space.names, "Bollard")))
    assert again(x).shape == (1, 12, 64, 80)


def test_the_decoder_can_lose_a_larger_share_than_the_backbone(teacher_dir):
    model = load_model(teacher_dir)
    backbone = list(model.backbone.channels)
    decoder = [m.out_channels for m in model.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    prune_channels(model, 0.2, decoder_ratio=0.75)
    kept = [m.out_channels for m in model.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    # The decoder's own layers (not the backbone output the ASPP reads) keep about a quarter.
    assert model.decoder.out_channels <= 0.3 * decoder[-1] + 8
    assert sum(kept) < 0.5 * sum(decoder)
    # The backbone's inner stages lose about their share (widths rounded to 8); its last output
    # is read by the ASPP, shares its channels with the decoder and follows the decoder's share.
    assert sum(model.backbone.channels[:-1]) >= 0.6 * sum(backbone[:-1])
    assert model.backbone.channels[-1] <= 0.3 * backbone[-1] + 8
    assert 0 < model.config.pruned < 0.75
    # Only the decoder: the backbone's inner stages keep their widths.
    model = prune_channels(load_model(teacher_dir), 0, decoder_ratio=0.5)
    assert list(model.backbone.channels)[:-1] == backbone[:-1]


def test_a_pruned_model_whose_weights_do_not_fit_is_refused(teacher_dir, tmp_path):
    model = prune_channels(load_model(teacher_dir), 0.5)
    save_model(model, tmp_path / "p")
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "p" / "model.safetensors"))
    key = next(k for k, v in state.items() if k.startswith("decoder") and v.dim() == 4 and v.shape[1] > 1)
    state[key] = torch.zeros(state[key].shape[0], 3, 3)  # a 3-d tensor where a convolution's weight was
    save_file(state, str(tmp_path / "p" / "model.safetensors"))
    with pytest.raises(ValueError, match="does not fit"):
        load_model(tmp_path / "p")


@pytest.mark.slow
def test_compress_prunes_fine_tunes_with_the_teacher_and_resumes(teacher_dir, tiny_camvid, tmp_path):
    result = compress_model(teacher_dir, 0.5, _cfg(tiny_camvid), tmp_path / "c", progress=False)
    history = read_history(tmp_path / "c")
    assert "loss_kd" in history[0] and history[0]["loss_kd"] >= 0
    pruned = load_trained_model(result.model_dir)
    meta = pruned.metadata
    assert meta["pruned_from"] == str(teacher_dir.resolve()) and meta["macs_after"] < meta["macs_before"]
    # Pruning is deterministic, so the run continues on the same narrower model.
    result = compress_model(teacher_dir, 0.5, _cfg(tiny_camvid, **{"train.epochs": 2}), tmp_path / "c",
                            resume=True, progress=False)
    assert result.epochs_run == 2
    # It exports and runs in ONNX Runtime like any model.
    report = export_model(result.model_dir, tmp_path / "c.onnx")
    assert report.agreement >= 0.995


@pytest.mark.slow
def test_distill_trains_a_student_of_another_architecture(teacher_dir, tiny_camvid, tmp_path):
    result = distill_model(teacher_dir, "lraspp/mobilenet_v2", _cfg(tiny_camvid), tmp_path / "s",
                           channel_weight=1.0, progress=False)
    student = load_trained_model(result.model_dir)
    assert student.config.arch == "lraspp" and student.config.pruned == 0
    assert student.metadata["distilled_from"] == str(teacher_dir.resolve())
    history = read_history(tmp_path / "s")
    assert {"loss_seg", "loss_kd", "loss_kd_channel"} <= set(history[0])


def test_the_teacher_must_know_the_students_classes(teacher_dir, tiny_camvid):
    from everseg.data.labelspace import LabelSpace

    teacher = load_model(teacher_dir)
    teacher.reset_classifier(LabelSpace(names=("a", "b")))
    plugin = TeacherDistillation(teacher)

    class _Trainer:  # what on_fit_start reads
        train_set = open_dataset(tiny_camvid, dataset="folder", split="train")

    with pytest.raises(ValueError, match="teacher's classes"):
        plugin.on_fit_start(_Trainer())
