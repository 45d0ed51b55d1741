"""loss.aux_weight: an auxiliary head supervises the backbone's middle while it trains, resumes with
the run, and leaves the saved model as a model trained without it."""

import pytest
import torch

from everseg.learn.auxiliary import AuxiliaryHead, supervised_stage
from everseg.learn.continual import _step_config
from everseg.learn.losses import LossShape, SegmentationLoss
from everseg.models import load_model

from test_trainer import assert_same_state, interrupted_and_resumed, make_trainer, tiny_config


def test_the_cross_entropy_alone_is_the_losss_own_term_with_its_weights_and_shape():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 4, 6, 5), torch.randint(0, 4, (2, 6, 5))
    target[0, 0, 0] = 255
    loss = SegmentationLoss("ce", class_weights=torch.tensor([1.0, 2.0, 0.5, 1.0]), label_smoothing=0.1)
    torch.testing.assert_close(loss.cross_entropy(logits, target), loss(logits, target))
    shape = LossShape()
    shape.merge_background(3, "test")
    torch.testing.assert_close(loss.cross_entropy(logits, target, shape), loss(logits, target, shape))
    assert not torch.allclose(loss.cross_entropy(logits, target, shape), loss(logits, target))
    # Whatever the loss's kind: the Dice term is not in it.
    both = SegmentationLoss("ce+dice", class_weights=torch.tensor([1.0, 2.0, 0.5, 1.0]), label_smoothing=0.1)
    torch.testing.assert_close(both.cross_entropy(logits, target), loss(logits, target))


def test_the_head_reads_the_second_deepest_stage_and_answers_at_the_labels_size():
    head = AuxiliaryHead(96, 5)
    assert head(torch.randn(2, 96, 3, 4), (48, 64)).shape == (2, 5, 48, 64)

    class Stages(torch.nn.Module):
        channels = (16, 24, 32, 96, 320)

    assert supervised_stage(Stages()) == 3
    Stages.channels = (320,)
    with pytest.raises(ValueError, match="two feature stages"):
        supervised_stage(Stages())


def test_later_incremental_steps_train_no_auxiliary_head(tiny_camvid):
    cfg = tiny_config(tiny_camvid, **{"loss.aux_weight": 0.4})
    assert _step_config(cfg, False, None, None, None, 0.0, 0).loss.aux_weight == 0.4
    assert _step_config(cfg, True, 2, None, None, 0.0, 1).loss.aux_weight == 0.0


def test_a_frozen_backbone_gets_no_head_and_a_negative_weight_is_refused(tiny_camvid, tmp_path):
    frozen = tiny_config(tiny_camvid, **{"loss.aux_weight": 0.4, "train.finetune": "frozen"})
    assert make_trainer(frozen, tmp_path / "run").auxiliary is None
    with pytest.raises(ValueError, match="aux_weight"):
        tiny_config(tiny_camvid, **{"loss.aux_weight": -1})


def test_one_step_sends_the_heads_gradient_into_the_backbones_middle(tiny_camvid, tmp_path):
    cfg = tiny_config(tiny_camvid, **{"loss.aux_weight": 0.4, "train.channels_last": False})
    trainer = make_trainer(cfg, tmp_path / "run")
    raw = next(iter(torch.utils.data.DataLoader(trainer.train_set, batch_size=2)))
    batch = trainer.to_batch(raw)
    _, terms = trainer._forward_terms(batch)
    assert set(terms) == {"seg", "aux"} and torch.isfinite(terms["aux"]) and terms["aux"] > 0
    terms["aux"].backward()
    middle = trainer.model.backbone.stages[supervised_stage(trainer.model.backbone)]
    assert all(p.grad is not None for p in trainer.auxiliary.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in middle.parameters())
    # The deepest stage and the decoder are not on the head's path.
    assert all(p.grad is None for p in trainer.model.decoder.parameters())


@pytest.mark.slow
def test_a_run_with_the_head_resumes_as_if_never_stopped_and_saves_a_plain_model(tiny_camvid, tmp_path):
    cfg = tiny_config(tiny_camvid, **{"data.val_split": None, "loss.aux_weight": 0.4})
    full = make_trainer(cfg, tmp_path / "full")
    n_model = sum(1 for _ in full.model.parameters())
    full.fit()
    assert len([p for g in full.optimizer.param_groups for p in g["params"]]) == \
        n_model + sum(1 for _ in full.auxiliary.parameters())
    assert all("loss_aux" in h for h in full.history)
    resumed = interrupted_and_resumed(cfg, tmp_path / "cut")
    assert_same_state(full.model, resumed.model)
    assert_same_state(full.auxiliary, resumed.auxiliary, "auxiliary")
    # The saved model is the architecture alone: nothing of the head in it.
    saved = load_model(tmp_path / "full" / "model")
    assert saved.state_dict().keys() == full.model.state_dict().keys()
    # A resume that would drop (or add) the head is refused before anything is loaded.
    without = tiny_config(tiny_camvid, **{"data.val_split": None, "train.epochs": 4})
    with pytest.raises(ValueError, match="auxiliary head"):
        make_trainer(without, tmp_path / "cut").fit(resume=True)
