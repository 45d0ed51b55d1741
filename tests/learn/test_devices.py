"""Devices and mixed precision: the CPU path everywhere, the CUDA path where CUDA exists."""

import pytest
import torch

from everseg.devices import Precision, check_device_name, choose_precision, resolve_device
from everseg.learn import Plugin, load_config
from everseg.workflows import load_trained_model

from test_trainer import make_trainer, tiny_config

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:1", "mps", " CUDA:0 "])
def test_device_names(name):
    assert check_device_name(name) == name.strip().lower()


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "tpu", ""])
def test_unknown_device_names_are_refused_with_the_option(name):
    with pytest.raises(ValueError, match="--device .*unknown device.*auto, cpu, cuda"):
        check_device_name(name, "--device")
    with pytest.raises(ValueError, match="train.device"):
        load_config(None, {"train.device": name})


def test_auto_is_cuda_when_present_else_the_cpu():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@no_cuda
def test_a_gpu_that_is_not_there_is_an_error_not_a_silent_cpu_run():
    with pytest.raises(ValueError, match="train.device cuda: CUDA is not available"):
        resolve_device("cuda")


def test_precision_on_the_cpu_follows_train_bf16():
    cpu = torch.device("cpu")
    assert choose_precision(cpu, "off").dtype is None
    assert choose_precision(cpu, "on").dtype == torch.bfloat16
    assert not choose_precision(cpu, "on").scaled


@needs_cuda
def test_precision_on_cuda_is_bf16_where_supported_else_fp16_with_a_scaler():
    p = choose_precision(torch.device("cuda"), "auto")
    assert p.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    assert p.scaled == (p.dtype == torch.float16)


class Holds(Plugin):
    """A plugin that runs a model of its own beside the trained one (as a teacher does)."""

    def __init__(self):
        self.other = torch.nn.Linear(2, 2)
        self.device_at_start = None

    def frozen_models(self):
        return [self.other]

    def on_fit_start(self, trainer):
        self.device_at_start = next(self.other.parameters()).device


@pytest.mark.slow
def test_the_trainer_moves_model_batches_and_plugin_models_to_its_device(tiny_camvid, tmp_path):
    cfg = tiny_config(tiny_camvid, **{"train.epochs": 1, "train.device": "auto", "data.val_split": None})
    plugin = Holds()
    trainer = make_trainer(cfg, tmp_path / "run", plugins=[plugin])
    expected = resolve_device("auto")
    assert trainer.device == expected and next(trainer.model.parameters()).device.type == expected.type
    batch = trainer.to_batch(next(iter(trainer._loader(torch.Generator().manual_seed(0)))))
    assert batch.image.device.type == expected.type and batch.mask.device.type == expected.type
    assert batch.image.dtype == torch.float32 and 0 <= float(batch.image.min()) <= float(batch.image.max()) <= 1
    trainer.fit()
    assert plugin.device_at_start.type == expected.type


@pytest.mark.slow
def test_float16_with_a_gradient_scaler_trains_and_resumes(tiny_camvid, tmp_path):
    # The scaled path (what a GPU without bfloat16 runs) exercised on the CPU, which has
    # float16 autocast and a GradScaler of its own.
    cfg = tiny_config(tiny_camvid, **{"train.epochs": 2, "data.val_split": None})

    def fp16_trainer(out):
        trainer = make_trainer(cfg, out)
        trainer.precision = Precision(torch.device("cpu"), torch.float16)
        trainer.scaler = trainer.precision.grad_scaler()
        return trainer

    trainer = fp16_trainer(tmp_path / "run")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = trainer.fit()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() > 0
    changed = [k for k, v in trainer.model.state_dict().items() if v.is_floating_point()
               and not torch.equal(v, before[k])]
    assert changed, "no weight moved: every scaled step was skipped"
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["scaler"]["scale"] == trainer.scaler.get_scale()
    resumed = fp16_trainer(tmp_path / "run")
    resumed.fit(resume=True)
    assert resumed.scaler.get_scale() == trainer.scaler.get_scale()


@needs_cuda
@pytest.mark.slow
def test_trained_on_cuda_resumes_and_evaluates_on_the_cpu(tiny_camvid, tmp_path):
    from everseg.data import open_dataset
    from everseg.evaluate import evaluate

    cfg = tiny_config(tiny_camvid, **{"train.epochs": 1, "train.device": "cuda", "data.val_split": None})
    make_trainer(cfg, tmp_path / "run").fit()
    on_cpu = tiny_config(tiny_camvid, **{"train.epochs": 2, "train.device": "cpu", "data.val_split": None})
    result = make_trainer(on_cpu, tmp_path / "run").fit(resume=True)
    assert result.epochs_run == 2
    test = open_dataset(tiny_camvid, dataset="folder", split="test")
    gpu = evaluate(load_trained_model(tmp_path / "run", device="cuda"), test, progress=False).metrics
    cpu = evaluate(load_trained_model(tmp_path / "run", device="cpu"), test, progress=False).metrics
    assert abs(gpu.miou - cpu.miou) < 1.0


def test_an_onnx_file_runs_on_the_cpu_only(tmp_path):
    with pytest.raises(ValueError, match="--device cuda: .*ONNX file.*CPU"):
        load_trained_model(tmp_path / "model.onnx", device="cuda")
