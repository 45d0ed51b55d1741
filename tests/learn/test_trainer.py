"""The training loop on real (tiny) images: learning, resume, fine-tuning modes, plugins."""

import json

import pytest
import torch

from everseg.learn import GradualUnfreeze, Plugin, Trainer, load_config
from everseg.learn.run import build_datasets, build_model, finetune_plugins
from everseg.models import load_model


def tiny_config(data_path, **overrides):
    base = {"data.path": str(data_path), "data.dataset": "folder", "data.val_split": "test",
            "data.crop_size": [48, 64], "data.scale": [0.8, 1.2], "model.arch": "deeplabv3plus",
            "model.backbone": "mobilenet_v2", "model.pretrained": False, "train.epochs": 3,
            "train.batch_size": 4, "train.log_every": 1, "optim.lr": 0.05, "train.bf16": "off"}
    base.update(overrides)
    return load_config(None, base)


def make_trainer(cfg, out, plugins=()):
    train_set, val_set = build_datasets(cfg)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, train_set)
    return Trainer(model, train_set, val_set, cfg, out, plugins=[*finetune_plugins(cfg), *plugins],
                   progress=False)


@pytest.mark.slow
def test_fit_writes_run_folder_and_learns(tiny_camvid, tmp_path):
    cfg = tiny_config(tiny_camvid, **{"train.epochs": 4})
    result = make_trainer(cfg, tmp_path / "run").fit()
    run = tmp_path / "run"
    for name in ("config.yaml", "checkpoint.pt", "history.json", "model/config.json"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").iterdir())
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert history[-1]["loss"] < history[0]["loss"]
    assert result.best_miou is not None and 0 <= result.best_miou <= 100
    model = load_model(run / "model")
    assert model.label_space.names[0] == "Sky"


class Crash(Plugin):
    """Simulates a killed process: raises in the middle of epoch ``epoch``."""

    def __init__(self, epoch):
        self.epoch = epoch

    def after_step(self, trainer, batch, output):
        if trainer.epoch == self.epoch:
            raise KeyboardInterrupt("killed")


def interrupted_and_resumed(cfg, run):
    """The Trainer that finished a run killed in its third epoch and resumed."""
    with pytest.raises(KeyboardInterrupt):
        make_trainer(cfg, run, plugins=[Crash(epoch=2)]).fit()
    resumed = make_trainer(cfg, run)
    resumed.fit(resume=True)
    return resumed


def assert_same_state(a, b, what="model"):
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, msg=f"{what} {k} differs after resume")


@pytest.mark.slow
def test_resume_after_interruption_matches_uninterrupted_run(tiny_camvid, tmp_path):
    cfg = tiny_config(tiny_camvid, **{"data.val_split": None})
    full = make_trainer(cfg, tmp_path / "full")
    full.fit()
    with pytest.raises(KeyboardInterrupt):
        make_trainer(cfg, tmp_path / "cut", plugins=[Crash(epoch=2)]).fit()
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert state["loop"]["epoch"] == 2  # two whole epochs kept, the third lost
    resumed = make_trainer(cfg, tmp_path / "cut")
    result = resumed.fit(resume=True)
    assert result.epochs_run == 3
    assert len(result.history) == 3
    assert_same_state(full.model, resumed.model)


@pytest.mark.slow
def test_resume_refuses_other_model_settings(tiny_camvid, tmp_path):
    cfg = tiny_config(tiny_camvid, **{"train.epochs": 1, "data.val_split": None})
    make_trainer(cfg, tmp_path / "run").fit()
    other = tiny_config(tiny_camvid, **{"train.epochs": 2, "data.val_split": None, "model.dropout": 0.3})
    with pytest.raises(ValueError, match="differ"):
        make_trainer(other, tmp_path / "run").fit(resume=True)


@pytest.mark.slow
def test_frozen_backbone_keeps_backbone_and_its_statistics(tiny_camvid, tmp_path):
    cfg = tiny_config(tiny_camvid, **{"train.epochs": 1, "train.finetune": "frozen", "data.val_split": None})
    trainer = make_trainer(cfg, tmp_path / "run")
    before = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items()}
    head_before = trainer.model.classifier.weight.detach().clone()
    trainer.fit()
    for k, v in trainer.model.backbone.state_dict().items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(v, before[k], msg=f"backbone {k} changed")
    assert not torch.equal(trainer.model.classifier.weight, head_before)


def test_gradual_unfreeze_opens_deepest_chunks_first(tiny_camvid, tmp_path):
    cfg = tiny_config(tiny_camvid, **{"data.val_split": None})
    trainer = make_trainer(cfg, tmp_path / "run")
    plugin = GradualUnfreeze(every=1, chunks=2)
    params = list(trainer.model.backbone.parameters())
    for epoch, (first, last) in enumerate([(False, False), (False, True), (True, True)]):
        trainer.epoch = epoch
        trainer.model.train()
        plugin.on_epoch_start(trainer)
        assert params[0].requires_grad is first and params[-1].requires_grad is last


@pytest.mark.slow
def test_extra_loss_terms_and_hooks_are_called(tiny_camvid, tmp_path):
    calls = []

    class Probe(Plugin):
        needs_features = True

        def on_fit_start(self, trainer):
            calls.append("fit_start")

        def loss_terms(self, trainer, batch, output):
            assert output.features is not None and "backbone" in output.features
            return {"probe": output.logits.float().pow(2).mean() * 1e-3}

        def on_fit_end(self, trainer):
            calls.append("fit_end")

    cfg = tiny_config(tiny_camvid, **{"train.epochs": 1, "data.val_split": None})
    result = make_trainer(cfg, tmp_path / "run", plugins=[Probe()]).fit()
    assert calls == ["fit_start", "fit_end"]
    assert "loss_probe" in result.history[0] and "loss_seg" in result.history[0]


@pytest.mark.slow
def test_transfer_from_another_model_reinitialises_head(tiny_camvid, tmp_path):
    cfg = tiny_config(tiny_camvid, **{"train.epochs": 1, "data.val_split": None})
    make_trainer(cfg, tmp_path / "src").fit()
    # Same data, different class set: a binary "Road vs rest" copy of the dataset.
    binary = tmp_path / "binary"
    import shutil

    import numpy as np
    from PIL import Image

    shutil.copytree(tiny_camvid, binary)
    (binary / "classes.txt").write_text("rest\nroad\n")
    for p in (binary / "masks").glob("*.png"):
        m = np.array(Image.open(p))
        Image.fromarray(np.where(m == 255, 255, (m == 3).astype(np.uint8))).save(p)
    cfg2 = tiny_config(binary, **{"train.epochs": 1, "data.val_split": None,
                                  "model.init_from": str(tmp_path / "src" / "model")})
    trainer = make_trainer(cfg2, tmp_path / "dst")
    src_model = load_model(tmp_path / "src" / "model")
    assert trainer.model.classifier.out_channels == 2
    first = next(iter(src_model.backbone.state_dict()))
    torch.testing.assert_close(trainer.model.backbone.state_dict()[first], src_model.backbone.state_dict()[first])
    trainer.fit()
    assert load_model(tmp_path / "dst" / "model").label_space.names == ("rest", "road")


class FixedModel(Plugin):
    """Keeps the model in eval mode so that with lr 0 every validation scores the same."""

    def on_epoch_start(self, trainer):
        trainer.model.eval()


@pytest.mark.slow
def test_early_stopping_stops_when_miou_stalls(tiny_camvid, tmp_path):
    cfg = tiny_config(tiny_camvid, **{"train.epochs": 6, "train.early_stopping": 2, "optim.lr": 1e-12})
    result = make_trainer(cfg, tmp_path / "run", plugins=[FixedModel()]).fit()
    assert result.stopped_early and result.epochs_run == 3  # best at epoch 0, then 2 stale validations
    assert result.best_epoch == 0


@pytest.mark.slow
def test_grad_accumulation_adamw_cosine_and_time_budget(tiny_camvid, tmp_path):
    cfg = tiny_config(tiny_camvid, **{"train.epochs": 2, "train.batch_size": 2, "train.grad_accum": 2,
                                      "optim.optimizer": "adamw", "optim.lr": 1e-3, "optim.schedule": "cosine",
                                      "optim.warmup_epochs": 0.5, "data.val_split": None})
    trainer = make_trainer(cfg, tmp_path / "run")
    result = trainer.fit()
    assert trainer.global_step == 2 * (8 // 2) // 2  # 4 batches an epoch, one step per two batches
    assert result.epochs_run == 2
    budget = tiny_config(tiny_camvid, **{"train.epochs": 50, "train.max_minutes": 1e-6, "data.val_split": None,
                                         "train.batch_size": 2})
    cut = make_trainer(budget, tmp_path / "budget")
    result = cut.fit()
    # The budget ends inside the first epoch: it is cut after the step that used it up.
    assert result.epochs_run == 1 and cut.global_step == 1 and result.images_seen == 2
    assert (tmp_path / "budget" / "model" / "config.json").is_file()


class OneSecondSteps(Plugin):
    def __init__(self, clock):
        self.clock = clock

    def before_forward(self, trainer, batch):
        self.clock.advance(1.0)  # each step's work takes one (fake) second


@pytest.mark.slow
def test_a_time_budget_stops_before_a_step_it_cannot_finish(tiny_camvid, tmp_path, fake_clock):
    cfg = tiny_config(tiny_camvid, **{"train.epochs": 50, "train.max_minutes": 3.5 / 60, "data.val_split": None,
                                      "train.batch_size": 2})
    trainer = make_trainer(cfg, tmp_path / "run", plugins=[OneSecondSteps(fake_clock)])
    result = trainer.fit()
    # Three steps end at 3 s; a fourth would end at 4 s, past the 3.5 s budget, so it is not started.
    assert trainer.global_step == 3 and result.train_seconds == pytest.approx(3.0)
    assert result.epochs_run == 1  # 4 steps an epoch: the first is cut, no second one begins


@pytest.mark.slow
def test_eta_counts_down_the_time_budget_not_the_remaining_epochs(tiny_camvid, tmp_path, fake_clock, capsys):
    cfg = tiny_config(tiny_camvid, **{"train.epochs": 50, "train.max_minutes": 30.5 / 60, "data.val_split": None,
                                      "train.batch_size": 2})
    train_set, _ = build_datasets(cfg)
    trainer = Trainer(build_model(cfg, train_set), train_set, None, cfg, tmp_path / "run",
                      plugins=[OneSecondSteps(fake_clock)], progress=True)
    trainer.fit()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch 1/50")]
    # 4 one-second steps an epoch: the epochs left would take 196 s, the budget has 26.5 s left.
    assert lines and lines[0].endswith("eta 0.4 min"), lines


@pytest.mark.slow
def test_train_with_the_same_seed_gives_the_same_model(tiny_camvid, tmp_path):
    from everseg.learn import train

    def weights(run, seed):
        cfg = tiny_config(tiny_camvid, **{"data.val_split": None, "train.epochs": 1, "train.seed": seed})
        return load_model(train(cfg, tmp_path / run, progress=False).model_dir).state_dict()

    first, again, other = weights("a", 0), weights("b", 0), weights("c", 1)
    for k, a in first.items():
        torch.testing.assert_close(a, again[k], msg=f"{k} differs between two runs with seed 0")
    assert any(not torch.equal(a, other[k]) for k, a in first.items() if a.is_floating_point())


@pytest.mark.slow
def test_a_diverging_loss_stops_training_with_the_term_named(tiny_camvid, tmp_path):
    class Explode(Plugin):
        def loss_terms(self, trainer, batch, output):
            return {"boom": output.logits.sum() * float("inf")}

    cfg = tiny_config(tiny_camvid, **{"data.val_split": None, "train.epochs": 1})
    with pytest.raises(FloatingPointError, match=r"epoch 1, step \d+: the loss is not finite.*boom="):
        make_trainer(cfg, tmp_path / "run", plugins=[Explode()]).fit()


def test_the_data_summary_counts_threads_in_words(tiny_camvid, tmp_path):
    cfg = tiny_config(tiny_camvid, **{"train.threads": 1})
    train, val = build_datasets(cfg)
    from everseg.models import create_model

    model = create_model(arch="lraspp", backbone="mobilenet_v2", label_space=train.label_space, pretrained=False)
    before = torch.get_num_threads()
    try:
        summary = Trainer(model, train, val, cfg, tmp_path / "run", progress=False)._data_summary()
    finally:
        torch.set_num_threads(before)
    assert summary.endswith("cpu, float32, 1 CPU thread")


def test_dilated_depthwise_convs_get_their_weight_gradients_right_in_bf16_channels_last():
    """The oneDNN fault this guards against shows on CPUs with native bfloat16 only (there the
    unguarded gradients were off by 87 % or infinite); elsewhere the comparison holds either way
    and the test checks what the guard sets up."""
    import copy

    from torch import nn

    from everseg.learn.trainer import dilated_depthwise_in_float32

    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(3, 32, 1), nn.Conv2d(32, 32, 3, padding=4, dilation=4, groups=32))
    model = nn.Sequential(nn.Conv2d(3, 32, 1), nn.Conv2d(32, 32, 3, padding=4, dilation=4, groups=32))
    model.load_state_dict(reference.state_dict())
    model.to(memory_format=torch.channels_last)
    handles = dilated_depthwise_in_float32(model)
    assert len(handles) == 1 and model[1].weight.is_contiguous() and isinstance(model[1], nn.Conv2d)
    assert list(copy.deepcopy(model).state_dict()) == list(reference.state_dict())  # names unchanged
    seen = []
    model[1].register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    for width in (64, 320):  # a wide map is where the fault first showed
        model.zero_grad(), reference.zero_grad()
        x = torch.randn(1, 3, 48, width)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x.contiguous(memory_format=torch.channels_last)).float().square().mean().backward()
        reference(x).square().mean().backward()
        got, want = model[1].weight.grad.float(), reference[1].weight.grad
        assert float((got - want).norm() / want.norm()) < 0.05
    assert seen == [torch.float32] * 2  # the convolution ran in float32 inside the bfloat16 autocast
    for h in handles:
        h.remove()
    assert type(model[1]) is nn.Conv2d


@pytest.mark.slow
def test_bf16_training_runs_dilated_depthwise_convs_in_float32_and_restores_them(tiny_camvid, tmp_path):
    cfg = tiny_config(tiny_camvid, **{"data.val_split": None, "train.epochs": 1, "train.bf16": "on",
                                      "model.arch": "lraspp", "model.output_stride": 16})
    trainer = make_trainer(cfg, tmp_path / "run")
    dilated = [m for m in trainer.model.modules()
               if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1 and max(m.dilation) > 1]
    assert dilated  # MobileNetV2 at output stride 16 dilates its last stage
    inputs = []
    dilated[0].register_forward_hook(lambda m, args, out: inputs.append(out.dtype))
    trainer.fit()
    assert inputs and all(dtype == torch.float32 for dtype in inputs)
    assert all(type(m) is torch.nn.Conv2d for m in dilated)  # nothing left behind after fit
