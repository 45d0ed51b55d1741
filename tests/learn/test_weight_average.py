"""train.ema_decay: the weight average is what is validated, saved, resumed and handed back."""

import pytest
import torch
from torch import nn

from everseg.learn.ema import WeightAverage
from everseg.models import load_model

from test_trainer import assert_same_state, interrupted_and_resumed, make_trainer, tiny_config


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def test_the_average_follows_the_ramped_decay_and_copies_integer_buffers():
    net = _net()
    avg = WeightAverage(net, 0.99)
    start = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net[1].num_batches_tracked += 5
    avg.update(net)  # first update: decay min(0.99, 1/10)
    torch.testing.assert_close(avg.shadow["0.weight"], start + 0.9)
    assert int(avg.shadow["1.num_batches_tracked"]) == 5
    for _ in range(2000):  # the ramp ends at the configured decay
        avg.update(net)
    assert avg._decay_now() == 0.99
    torch.testing.assert_close(avg.shadow["0.weight"], start + 1.0)


def test_swapped_into_shows_the_average_and_gives_the_weights_back():
    net = _net()
    avg = WeightAverage(net, 0.5)
    own = net[0].weight.detach().clone()
    avg.shadow["0.weight"].fill_(7.0)
    with avg.swapped_into(net):
        assert torch.all(net[0].weight == 7.0)
    torch.testing.assert_close(net[0].weight.detach(), own)


def test_a_saved_average_loads_only_into_the_same_model():
    net = _net()
    avg = WeightAverage(net, 0.9)
    avg.update(net)
    again = WeightAverage(_net(), 0.9)
    again.load_state_dict(avg.state_dict())
    assert again.updates == 1
    with pytest.raises(ValueError, match="does not match"):
        WeightAverage(nn.Linear(3, 2), 0.9).load_state_dict(avg.state_dict())


def test_a_decay_outside_0_1_is_refused():
    with pytest.raises(ValueError, match="ema_decay"):
        WeightAverage(_net(), 1.0)


@pytest.mark.slow
def test_the_run_saves_and_returns_the_average_not_the_last_weights(tiny_camvid, tmp_path):
    cfg = tiny_config(tiny_camvid, **{"train.epochs": 2, "train.ema_decay": 0.9})
    trainer = make_trainer(cfg, tmp_path / "run")
    trainer.fit()
    saved = load_model(tmp_path / "run" / "model").state_dict()
    trained = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["model"]
    ended = trainer.model.state_dict()
    average = trainer.average.shadow
    # The best validated model is an average (of epoch 1 or 2), the model left in memory the last.
    assert any(not torch.equal(saved[k], trained[k].to(saved[k].dtype)) for k in saved)
    if trainer.best_epoch == 1:
        for k, v in average.items():
            torch.testing.assert_close(saved[k], v.to(saved[k].dtype), msg=k)
    for k, v in ended.items():
        torch.testing.assert_close(v, average[k])


@pytest.mark.slow
def test_a_run_with_an_average_resumes_as_if_never_stopped(tiny_camvid, tmp_path):
    cfg = tiny_config(tiny_camvid, **{"data.val_split": None, "train.ema_decay": 0.9})
    full = make_trainer(cfg, tmp_path / "full")
    full.fit()
    resumed = interrupted_and_resumed(cfg, tmp_path / "cut")
    assert_same_state(full.model, resumed.model)
    # Without validation the model saved is the latest average, the same as the one returned.
    saved = load_model(tmp_path / "cut" / "model").state_dict()
    for k, v in resumed.model.state_dict().items():
        torch.testing.assert_close(saved[k], v.to(saved[k].dtype), msg=k)
    off = tiny_config(tiny_camvid, **{"data.val_split": None, "train.epochs": 4})
    with pytest.raises(ValueError, match="ema_decay on"):
        make_trainer(off, tmp_path / "cut").fit(resume=True)
