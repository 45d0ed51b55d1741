"""create_model's arguments, the Segmenter's class-set methods and ModelConfig."""

from __future__ import annotations

import json

import pytest
import torch

from everseg.data.labelspace import LabelSpace
from everseg.models import (
    ARCHITECTURES,
    BACKBONES,
    ModelConfig,
    Segmenter,
    create_model,
)
from everseg.models import __all__ as public_names


def tiny(**kwargs) -> Segmenter:
    args = {"arch": "lraspp", "backbone": "timm:mobilenetv3_small_050", "num_classes": 3, "pretrained": False}
    args.update(kwargs)
    torch.manual_seed(0)
    return create_model(**args)


def test_public_names() -> None:
    assert set(public_names) >= {
        "create_model", "Segmenter", "ModelConfig", "save_model", "load_model",
        "resolve_pretrained_weights", "ARCHITECTURES", "BACKBONES", "WeightsUnavailableError",
    }
    assert ARCHITECTURES == ("deeplabv3plus", "deeplabv3", "lraspp", "fcn", "unet")
    assert BACKBONES == ("mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1",
                         "efficientnet_lite2", "resnet18", "resnet50")


def test_arguments_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        create_model("fcn", "resnet18", 3)  # type: ignore[misc]


def test_unknown_arch_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        tiny(arch="segformer")
    assert all(a in str(info.value) for a in ARCHITECTURES)


def test_unknown_backbone_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        tiny(backbone="vgg16")
    assert all(b in str(info.value) for b in BACKBONES) and "timm:" in str(info.value)


def test_unknown_timm_model() -> None:
    with pytest.raises(ValueError, match="no_such_net"):
        tiny(backbone="timm:no_such_net")


def test_timm_model_without_dilation_support() -> None:
    with pytest.raises(ValueError, match="output_stride"):
        tiny(arch="fcn", backbone="timm:ghostnet_050", output_stride=8)
    model = tiny(arch="fcn", backbone="timm:ghostnet_050", output_stride=32)
    assert model.backbone.reductions[-1] == 32


@pytest.mark.parametrize(
    "kwargs",
    [{"output_stride": 4}, {"dropout": 1.0}, {"decoder_channels": 0}, {"num_classes": 0},
     {"num_classes": None}],
)
def test_bad_arguments(kwargs) -> None:
    with pytest.raises(ValueError):
        tiny(**kwargs)


def test_pretrained_must_be_bool_or_path() -> None:
    with pytest.raises(TypeError):
        tiny(pretrained=1)


def test_num_classes_only_makes_generic_names() -> None:
    model = tiny(num_classes=4)
    assert model.label_space.names == ("class0", "class1", "class2", "class3")
    assert model.num_classes == model.config.num_classes == 4


def test_label_space_only_and_consistency_check() -> None:
    labels = LabelSpace(names=("a", "b"))
    model = tiny(num_classes=None, label_space=labels)
    assert model.label_space is labels and model.classifier.out_channels == 2
    assert tiny(num_classes=2, label_space=labels).num_classes == 2
    with pytest.raises(ValueError, match="disagrees"):
        tiny(num_classes=3, label_space=labels)


def test_decoder_channels_and_dropout_are_recorded() -> None:
    model = tiny(arch="deeplabv3plus", decoder_channels=32, dropout=0.3)
    assert model.config.decoder_channels == 32 and model.decoder.out_channels == 32
    assert model.dropout.p == 0.3 and model.config.dropout == 0.3
    assert tiny(arch="deeplabv3").config.decoder_channels == 256
    assert tiny(arch="lraspp").config.decoder_channels == 128


def test_aspp_rates_set_the_dilations_and_survive_saving(tmp_path) -> None:
    from everseg.models import load_model, save_model

    model = tiny(arch="deeplabv3plus", decoder_channels=32, aspp_rates=[3, 6, 9])
    dilations = [branch[0].dilation for branch in model.decoder.aspp.branches[1:-1]]
    assert dilations == [(3, 3), (6, 6), (9, 9)] and model.config.aspp_rates == (3, 6, 9)
    save_model(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["config"]["aspp_rates"] == [3, 6, 9]
    again = load_model(tmp_path / "m")
    assert again.decoder.aspp.rates == (3, 6, 9) and again.config == model.config
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(again(x), model.eval()(x))
    # Two rates make two dilated branches; the projection reads what they give.
    assert len(tiny(arch="deeplabv3", decoder_channels=32, aspp_rates=[2, 4]).decoder.aspp.branches) == 4


def test_default_aspp_rates_are_the_papers_and_stay_out_of_the_saved_config(tmp_path) -> None:
    from everseg.models import save_model

    assert tiny(arch="deeplabv3plus", decoder_channels=32).decoder.aspp.rates == (6, 12, 18)
    assert tiny(arch="deeplabv3", decoder_channels=32, output_stride=8).decoder.aspp.rates == (12, 24, 36)
    save_model(tiny(arch="deeplabv3plus", decoder_channels=32), tmp_path / "m")
    assert "aspp_rates" not in json.loads((tmp_path / "m" / "config.json").read_text())["config"]


def test_aspp_rates_scaled_to_the_crop_keep_the_papers_geometry() -> None:
    from everseg.models.decoders import aspp_rates_for_crop

    assert aspp_rates_for_crop((513, 513), 16) == (6, 12, 18)
    assert aspp_rates_for_crop((288, 384), 16) == (3, 7, 10)  # the CamVid crop: an 18x24 map
    assert aspp_rates_for_crop((384, 288), 8) == aspp_rates_for_crop((288, 1024), 8) == (7, 13, 20)
    assert aspp_rates_for_crop(None, 16) == (6, 12, 18) and aspp_rates_for_crop((32, 32), 16) == (1, 1, 1)


@pytest.mark.parametrize("rates", [[], [0, 6], [2.5], "3,6,9", [True]])
def test_bad_aspp_rates(rates) -> None:
    with pytest.raises(ValueError, match="aspp_rates"):
        tiny(arch="deeplabv3plus", aspp_rates=rates)


def test_aspp_rates_on_a_decoder_without_aspp() -> None:
    with pytest.raises(ValueError, match="aspp_rates applies to deeplabv3"):
        tiny(arch="lraspp", aspp_rates=[3, 6, 9])


def test_normalisation_follows_the_backbone() -> None:
    assert tiny(backbone="efficientnet_lite0").config.mean == (0.5, 0.5, 0.5)
    resnet = tiny(backbone="resnet18", arch="fcn")
    assert resnet.config.mean == (0.485, 0.456, 0.406) and resnet.config.std == (0.229, 0.224, 0.225)
    torch.testing.assert_close(resnet.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))


def test_input_checks() -> None:
    model = tiny().eval()
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        model(torch.rand(1, 1, 32, 32))
    with pytest.raises(TypeError, match="float"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_parameter_groups_partition_the_model() -> None:
    model = tiny(arch="unet")
    backbone = {id(p) for p in model.backbone_parameters()}
    head = {id(p) for p in model.head_parameters()}
    assert backbone and head and not backbone & head
    assert backbone | head == {id(p) for p in model.parameters()}
    assert id(model.classifier.weight) in head


def test_reset_classifier_for_a_grown_label_space() -> None:
    model = tiny()
    decoder_state = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    grown = model.label_space.extend(["bus", "tram"])
    model.reset_classifier(grown)
    assert model.classifier.out_channels == 5 and model.config.num_classes == 5
    assert model.label_space == grown
    assert model.eval()(torch.rand(1, 3, 40, 40)).shape == (1, 5, 40, 40)
    assert all(torch.equal(v, model.decoder.state_dict()[k]) for k, v in decoder_state.items())
    model.reset_classifier(2)
    assert model.label_space.names == ("class0", "class1")


def test_reset_classifier_keeps_dtype_and_memory_format() -> None:
    model = tiny().to(torch.float64).to(memory_format=torch.channels_last)
    model.reset_classifier(6)
    assert model.classifier.weight.dtype == torch.float64
    assert model.classifier.weight.is_contiguous(memory_format=torch.channels_last)


def test_set_label_space() -> None:
    model = tiny()
    renamed = LabelSpace(names=("sky", "road", "car"))
    model.set_label_space(renamed)
    assert model.label_space == renamed
    with pytest.raises(ValueError, match="reset_classifier"):
        model.set_label_space(LabelSpace(names=("sky",)))


def test_model_config_round_trip() -> None:
    config = tiny(arch="fcn", output_stride=8).config
    as_json = json.loads(json.dumps(config.to_dict()))
    assert ModelConfig.from_dict(as_json) == config
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({**as_json, "colour": "red"})
    with pytest.raises(ValueError, match="missing"):
        ModelConfig.from_dict({"arch": "fcn"})


def test_return_features_gives_the_classifier_input() -> None:
    model = tiny(arch="deeplabv3plus").eval()
    x = torch.rand(1, 3, 48, 64)
    with torch.no_grad():
        logits, feats = model(x, return_features=True)
        by_hand = torch.nn.functional.interpolate(
            model.classifier(feats["decoder"]), size=(48, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(logits, by_hand)


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")
def test_onnx_export_with_dynamic_size(tmp_path) -> None:
    # The legacy exporter: the new one needs onnxscript, which is not a dependency.
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = tiny(arch="deeplabv3plus", backbone="efficientnet_lite0", decoder_channels=32).eval()
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (torch.rand(1, 3, 64, 64),), str(path), input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "n", 2: "h", 3: "w"}},
                      dynamo=False)
    session = ort.InferenceSession(str(path))
    x = torch.rand(2, 3, 65, 97)
    out = session.run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-4, atol=1e-4)
