"""Growing the classifier for new classes keeps what the model knew."""

import pytest
import torch

from everseg.data import LabelSpace
from everseg.models import create_model, load_model, save_model


@pytest.fixture
def model():
    torch.manual_seed(0)
    ls = LabelSpace(names=("background", "road", "sky"))
    m = create_model(arch="deeplabv3plus", backbone="mobilenet_v2", label_space=ls, pretrained=False)
    with torch.no_grad():  # a classifier that has learned something: non-trivial weights
        m.classifier.weight.normal_()
        m.classifier.bias.copy_(torch.tensor([0.5, -0.2, 0.1]))
    return m.eval()


def test_random_growth_keeps_old_logits(model, tmp_path):
    x = torch.rand(1, 3, 48, 64)
    before = model(x)
    grown_ls = model.label_space.extend(["car", "pole"])
    model.grow_classifier(grown_ls, init="random")
    after = model(x)
    assert after.shape[1] == 5 and model.label_space.taught_at == (0, 0, 0, 1, 1)
    torch.testing.assert_close(after[:, :3], before)
    save_model(model, tmp_path / "m")
    torch.testing.assert_close(load_model(tmp_path / "m")(x), after)


def test_mib_growth_splits_background_probability(model):
    x = torch.rand(1, 3, 48, 64)
    p_before = model(x).softmax(1)
    model.grow_classifier(model.label_space.extend(["car", "pole"]), init="background")
    logits = model(x)
    p_after = logits.softmax(1)
    # Old foreground probabilities are unchanged; background + new classes share the old background.
    torch.testing.assert_close(p_after[:, 1:3], p_before[:, 1:3], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(p_after[:, [0, 3, 4]].sum(1), p_before[:, 0], atol=1e-5, rtol=1e-4)
    # ... and split it evenly, since the new classes start as copies of the background.
    torch.testing.assert_close(p_after[:, 3], p_after[:, 0])


def test_growth_rejects_a_label_space_that_does_not_extend(model):
    with pytest.raises(ValueError, match="must start with"):
        model.grow_classifier(LabelSpace(names=("road", "background", "sky", "car")))
    with pytest.raises(ValueError, match="at least one"):
        model.grow_classifier(model.label_space)
