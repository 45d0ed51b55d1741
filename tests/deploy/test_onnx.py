"""ONNX export with everseg metadata, ONNX Runtime behind the model interface, int8."""

import json

import onnx
import pytest
import torch

from everseg.data import open_dataset
from everseg.deploy import OnnxModelError, export_onnx, load_onnx_model, read_metadata
from everseg.evaluate import evaluate, predict
from everseg.workflows import export_model, load_trained_model

pytest.importorskip("onnxruntime")


def test_dynamic_export_carries_metadata_and_runs_like_pytorch(model_dir, tiny_camvid, tmp_path):
    report = export_model(model_dir, tmp_path / "m.onnx", dynamic=True)
    assert report.agreement >= 0.995 and report.input_size is None
    meta = read_metadata(tmp_path / "m.onnx")
    net = load_trained_model(model_dir)
    assert json.loads(meta["everseg.label_space"])["names"] == list(net.label_space.names)
    assert json.loads(meta["everseg.normalization"])["mean"] == list(net.config.mean)
    assert json.loads(meta["everseg.input"])["layout"] == "NCHW"
    onnx_model = load_trained_model(tmp_path / "m.onnx")  # the loader every command uses
    assert onnx_model.label_space == net.label_space
    x = torch.randint(0, 256, (1, 3, 45, 67), dtype=torch.uint8)  # a size the export never saw
    assert (predict(onnx_model, x) == predict(net, x)).float().mean() > 0.999
    data = open_dataset(tiny_camvid, dataset="folder", split="test")
    eager = evaluate(net, data, progress=False).metrics.confusion
    ort = evaluate(onnx_model, data, progress=False).metrics.confusion
    assert abs(ort - eager).sum() <= 0.001 * eager.sum()


def test_a_fixed_size_file_says_so_for_other_sizes(model_dir, tmp_path):
    report = export_model(model_dir, tmp_path / "f.onnx", height=64, width=96)
    assert report.input_size == (64, 96)
    m = load_onnx_model(tmp_path / "f.onnx")
    assert m(torch.rand(2, 3, 64, 96)).shape == (2, 11, 64, 96)
    with pytest.raises(ValueError, match="exported for 64x96 images, got 32x32.*--dynamic"):
        m(torch.rand(1, 3, 32, 32))


def test_an_existing_file_is_kept_and_a_refused_export_writes_nothing(model_dir, tmp_path, monkeypatch):
    (tmp_path / "keep.onnx").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_model(model_dir, tmp_path / "keep.onnx")
    assert (tmp_path / "keep.onnx").read_bytes() == b"precious"
    net = load_trained_model(model_dir)
    # A file whose classes disagree with PyTorch's (here: the parity check is told so) is refused.
    import everseg.deploy.onnx as onnx_module

    monkeypatch.setattr(onnx_module, "parity", lambda *a: (0.9, 3.0))
    with pytest.raises(ValueError, match="not written.*90.00 %"):
        export_onnx(net, tmp_path / "new" / "q.onnx", min_agreement=0.99)
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.onnx"]


def test_int8_is_calibrated_on_the_users_data_and_says_what_stayed_float(model_dir, tiny_camvid, tmp_path):
    report = export_model(model_dir, tmp_path / "q.onnx", int8=True, calibration=tiny_camvid, split="train",
                          calibration_images=4, check_images=2, min_agreement=0.5)
    assert any("Resize" in line for line in report.kept_float)
    assert any("classifier" in line for line in report.kept_float)
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    assert any(n.op_type == "QuantizeLinear" for n in graph.node)
    classifier = [n for n in graph.node if n.op_type == "Conv"][-1]
    weight_producers = {o: n.op_type for n in graph.node for o in n.output}
    assert weight_producers.get(classifier.input[1]) != "DequantizeLinear"  # the classifier stayed float
    meta = read_metadata(tmp_path / "q.onnx")
    assert "calibration" in json.loads(meta["everseg.int8"])
    assert (tmp_path / "q.onnx").stat().st_size < 0.5 * export_model(model_dir, tmp_path / "f.onnx").path.stat().st_size
    m = load_trained_model(tmp_path / "q.onnx")
    assert m.int8 and predict(m, torch.rand(1, 3, 64, 80)).shape == (1, 64, 80)


def test_int8_keeps_in_float_the_convolutions_that_move_the_classes(model_dir, tiny_camvid, tmp_path):
    def int8_convs(path):
        graph = onnx.load(str(path)).graph
        producers = {o: n.op_type for n in graph.node for o in n.output}
        convs = [n for n in graph.node if n.op_type == "Conv"]
        return sum(producers.get(c.input[1]) == "DequantizeLinear" for c in convs), len(convs)

    loose = export_model(model_dir, tmp_path / "loose.onnx", int8=True, calibration=tiny_camvid,
                         calibration_images=4, check_images=2, min_agreement=0.5)
    strict = export_model(model_dir, tmp_path / "strict.onnx", int8=True, calibration=tiny_camvid,
                          calibration_images=4, check_images=2, min_agreement=0.97)
    # Every convolution in int8 moves 10 % of this untrained model's classes: the strict file
    # keeps the worst in float, says which, and meets its threshold; the loose one needs none.
    assert not any("moved the classes" in line for line in loose.kept_float)
    line = next(line for line in strict.kept_float if "moved the classes" in line)
    assert "aimed at 98.50 %" in line
    n_loose, total = int8_convs(tmp_path / "loose.onnx")
    n_strict, _ = int8_convs(tmp_path / "strict.onnx")
    assert n_loose == total - 1 and 0 < n_strict < n_loose
    assert strict.agreement >= 0.97 > loose.agreement


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_files_everseg_did_not_write_are_refused_clearly(tmp_path):
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(torch.nn.Conv2d(3, 2, 1), (torch.rand(1, 3, 8, 8),), str(plain), dynamo=False)
    with pytest.raises(OnnxModelError, match="no everseg metadata"):
        load_onnx_model(plain)
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(OnnxModelError, match="not a readable ONNX file"):
        load_onnx_model(tmp_path / "junk.onnx")
    with pytest.raises(FileNotFoundError, match="no such ONNX file"):
        load_onnx_model(tmp_path / "missing.onnx")
