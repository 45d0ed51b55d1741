"""Every bad input answered clearly: a table of odd images, masks, configs, class lists and
options run through the real command line, each expected to fail with one line that names
the input, and none with a traceback. Then the odd-but-valid inputs that must just work."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from everseg.cli import app
from everseg.data.labelspace import LabelSpace
from everseg.models import create_model, save_model

runner = CliRunner()
TINY = ("data:\n  crop_size: [48, 64]\n  val_split: test\nmodel:\n  pretrained: false\n"
        "train:\n  batch_size: 4\n  bf16: 'off'\n  epochs: 1\n")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    """The ``error:`` lines (one per problem: predict reports each unreadable image), no traceback."""
    out = result.output
    assert "Traceback" not in out and "internal error" not in out, out
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert lines, out
    return "\n".join(lines)


@pytest.fixture(scope="module")
def world(tiny_camvid, tmp_path_factory) -> dict[str, Path]:
    """Files for the cases: a saved (untrained) model, broken models, odd images and datasets."""
    root = tmp_path_factory.mktemp("world")
    names = tuple((tiny_camvid / "classes.txt").read_text().split("\n")[i].split()[0] for i in range(11))
    model = create_model(arch="lraspp", backbone="mobilenet_v2", label_space=LabelSpace(names=names),
                         pretrained=False)
    save_model(model, root / "model")
    w = {"model": root / "model", "data": tiny_camvid, "root": root}
    w["cfg"] = root / "tiny.yaml"
    w["cfg"].write_text(TINY)
    w["image"] = sorted((tiny_camvid / "images").glob("*.png"))[0]
    # Broken models.
    shutil.copytree(root / "model", root / "no_weights")
    (root / "no_weights" / "model.safetensors").unlink()
    shutil.copytree(root / "model", root / "bad_config")
    (root / "bad_config" / "config.json").write_text("{not json")
    shutil.copytree(root / "model", root / "bad_weights")
    (root / "bad_weights" / "model.safetensors").write_bytes(b"\x00" * 100)
    # Odd image files.
    (root / "text.png").write_text("this is not an image")
    (root / "empty.png").write_bytes(b"")
    (root / "truncated.png").write_bytes(w["image"].read_bytes()[:200])
    (root / "noimages").mkdir()
    (root / "a_file").write_text("x")
    # Odd datasets: a copy of the tiny one with one defect each.
    def variant(name: str, change) -> Path:
        d = root / name
        shutil.copytree(tiny_camvid, d)
        change(d)
        return d
    first_mask = lambda d: sorted((d / "masks").glob("*.png"))[0]  # noqa: E731
    w["wrong_size"] = variant("wrong_size", lambda d: Image.fromarray(np.zeros((10, 10), np.uint8)).save(first_mask(d)))
    w["bad_ids"] = variant("bad_ids", lambda d: Image.fromarray(np.full((64, 80), 40, np.uint8)).save(first_mask(d)))
    w["no_classes"] = variant("no_classes", lambda d: (d / "classes.txt").unlink())
    w["empty_classes"] = variant("empty_classes", lambda d: (d / "classes.txt").write_text("\n\n"))
    w["dup_classes"] = variant("dup_classes", lambda d: (d / "classes.txt").write_text("Sky\nRoad\nSky\n"))
    w["other_classes"] = variant("other_classes", lambda d: (d / "classes.txt").write_text(
        (tiny_camvid / "classes.txt").read_text().replace("Sky", "Himmel")))
    w["blank_classes"] = variant("blank_classes", lambda d: (d / "classes.txt").write_text(
        (tiny_camvid / "classes.txt").read_text().replace("\n", "\n\n", 1)))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.nn.Conv2d(3, 2, 1), (torch.rand(1, 3, 8, 8),), str(root / "plain.onnx"), dynamo=False)
    w["yaml_bad"] = root / "bad.yaml"
    w["yaml_bad"].write_text("optim: [unclosed\n")
    w["yaml_list"] = root / "list.yaml"
    w["yaml_list"].write_text("- 1\n- 2\n")
    w["yaml_section"] = root / "section.yaml"
    w["yaml_section"].write_text("optimizer:\n  lr: 1\n")
    return w


# (name, argv with {placeholders} from `world`, words the error line must hold)
CASES = [
    # model folders
    ("model missing", "eval --model {root}/nope --data {data}", ["{root}/nope", "no such model folder"]),
    ("model is a file", "eval --model {root}/a_file --data {data}", ["{root}/a_file", "not a model folder"]),
    ("model without weights", "eval --model {root}/no_weights --data {data}", ["model.safetensors", "missing"]),
    ("model with broken config", "eval --model {root}/bad_config --data {data}", ["config.json"]),
    ("model with broken weights", "eval --model {root}/bad_weights --data {data}", ["model.safetensors"]),
    # images to predict
    ("image missing", "predict --model {model} --out {root}/p1 {root}/nope.png", ["nope.png", "no such file"]),
    ("folder without images", "predict --model {model} --out {root}/p2 {root}/noimages", ["noimages", "no images"]),
    ("not an image", "predict --model {model} --out {root}/p3 {root}/text.png", ["text.png", "1 of 1"]),
    ("empty image file", "predict --model {model} --out {root}/p4 {root}/empty.png", ["1 of 1"]),
    ("truncated image", "predict --model {model} --out {root}/p5 {root}/truncated.png", ["1 of 1"]),
    ("--out is a file", "predict --model {model} --out {root}/a_file {image}", ["--out", "a_file", "is a file"]),
    # datasets and masks
    ("dataset missing", "eval --model {model} --data {root}/nodata", ["nodata", "does not exist"]),
    ("mask of another size", "data check {wrong_size}", ["wrong_size"]),
    ("mask ids out of range", "data check {bad_ids}", ["bad_ids", "40"]),
    ("mask of another size in eval", "eval --model {model} --data {wrong_size} --split train", ["wrong_size"]),
    ("no classes.txt", "eval --model {model} --data {no_classes}", ["classes.txt", "missing"]),
    ("empty classes.txt", "eval --model {model} --data {empty_classes}", ["classes.txt", "no classes"]),
    ("duplicate class", "data check {dup_classes}", ["classes.txt", "duplicate class name 'Sky'"]),
    ("blank line in classes", "data check {blank_classes}", ["classes.txt", "line 2 is blank"]),
    ("unknown split", "eval --model {model} --data {data} --split nosuch", ["nosuch"]),
    ("unknown dataset kind", "eval --model {model} --data {data} --dataset nosuch", ["nosuch", "folder"]),
    ("dataset classes unknown to model", "eval --model {model} --data {other_classes}", ["Himmel", "does not know"]),
    # configs
    ("lr nan", "train --config {cfg} --data {data} --out {root}/r1 --set optim.lr=nan", ["--set optim.lr=nan", "optim.lr", "finite"]),
    ("lr negative", "train --config {cfg} --data {data} --out {root}/r2 --set optim.lr=-1", ["optim.lr", "greater than 0"]),
    ("lr not a number", "train --config {cfg} --data {data} --out {root}/r3 --set optim.lr=abc", ["optim.lr"]),
    ("crop negative", "train --config {cfg} --data {data} --out {root}/r4 --set data.crop_size=[-1,128]", ["data.crop_size[0]"]),
    ("crop below the stride", "train --config {cfg} --data {data} --out {root}/r5 --set data.crop_size=[16,16]", ["data.crop_size", "32"]),
    ("zero epochs", "train --config {cfg} --data {data} --out {root}/r6 --epochs 0", ["--epochs 0", "train.epochs"]),
    ("unknown field", "train --config {cfg} --data {data} --out {root}/r7 --set optim.learning_rate=1", ["optim.learning_rate", "unknown field"]),
    ("unknown section", "train --config {yaml_section} --data {data} --out {root}/r8", ["section.yaml", "optimizer"]),
    ("override without =", "train --config {cfg} --data {data} --out {root}/r9 --set optim.lr", ["--set", "optim.lr"]),
    ("scale range reversed", "train --config {cfg} --data {data} --out {root}/r10 --set data.scale=[2,1]", ["data.scale"]),
    ("unknown loss", "train --config {cfg} --data {data} --out {root}/r11 --set loss.kind=foo", ["loss.kind"]),
    ("unknown arch", "train --config {cfg} --data {data} --out {root}/r12 --set model.arch=foo", ["model", "foo"]),
    ("unknown backbone", "train --config {cfg} --data {data} --out {root}/r13 --set model.backbone=foo", ["foo"]),
    ("config missing", "train --config {root}/nope.yaml --data {data} --out {root}/r14", ["nope.yaml", "does not exist"]),
    ("config not YAML", "train --config {yaml_bad} --data {data} --out {root}/r15", ["bad.yaml", "YAML"]),
    ("config a list", "train --config {yaml_list} --data {data} --out {root}/r16", ["list.yaml", "mapping"]),
    ("no data", "train --config {cfg} --out {root}/r17", ["--data"]),
    ("unknown val split", "train --config {cfg} --data {data} --out {root}/r18 --set data.val_split=nosuch", ["nosuch"]),
    # options
    ("scales not numbers", "eval --model {model} --data {data} --scales 1,abc", ["--scales", "1,abc"]),
    ("scale zero", "eval --model {model} --data {data} --scales 0", ["--scales"]),
    ("crop not HxW", "eval --model {model} --data {data} --mode slide --crop ax5", ["--crop", "ax5"]),
    ("crop zero", "eval --model {model} --data {data} --mode slide --crop 0x5", ["--crop"]),
    ("slide without crop", "eval --model {model} --data {data} --mode slide", ["crop"]),
    ("unknown mode", "eval --model {model} --data {data} --mode foo", ["mode", "foo"]),
    ("predict scales", "predict --model {model} --out {root}/p6 --scales x {image}", ["--scales"]),
    # incremental learning
    ("empty new classes", "learn --model {model} --data {data} --out {root}/l1 --new-classes ''", ["--new-classes", "names no class"]),
    ("only commas", "learn --model {model} --data {data} --out {root}/l2 --new-classes ,,", ["--new-classes"]),
    ("repeated class", "learn --model {model} --data {data} --out {root}/l3 --new-classes Car,Car", ["--new-classes", "more than once"]),
    ("new class the model has", "learn --model {model} --data {data} --out {root}/l4 --new-classes Sky", ["background"]),
    ("unknown strategy", "learn --model {model} --data {data} --out {root}/l5 --strategy foo", ["foo"]),
    ("bad strategy param", "learn --model {model} --data {data} --out {root}/l7 --strategy lwf --param lwf.alpha=3", ["lwf.alpha"]),
    ("param without value", "learn --model {model} --data {data} --out {root}/l8 --param lwf", ["--param", "lwf"]),
    ("negative minutes", "learn --model {model} --data {data} --out {root}/l9 --minutes -1", ["--minutes"]),
    ("learn into its own model", "learn --model {model} --data {data} --out {model}", ["the model this run starts from"]),
    ("unknown protocol", "scenario run --protocol nosuch --data {data} --out {root}/s1", ["nosuch"]),
    ("protocol and scenario", "scenario run --data {data} --out {root}/s2", ["--protocol", "--scenario"]),
    ("scenario file missing", "scenario run --scenario {root}/nope.yaml --data {data} --out {root}/s3", ["nope.yaml"]),
    # The strategy is checked before the data is read: the dataset here does not exist.
    ("scenario unknown strategy", "scenario run --protocol camvid-6-5 --data {root}/nodata --out {root}/s4 --strategy foo",
     ["foo", "unknown"]),
    ("scenario bad strategy param", "scenario run --protocol camvid-6-5 --data {root}/nodata --out {root}/s5 "
     "--strategy mib --param lwf.weight=3", ["lwf.weight", "not one of this run's strategies"]),
    # export and ONNX files
    ("export a folder that is not a model", "export --model {root}/noimages --out {root}/e1.onnx", ["noimages", "not an everseg model"]),
    ("export over a file", "export --model {model} --out {root}/a_file", ["a_file", "--overwrite"]),
    ("export to a name without .onnx", "export --model {model} --out {root}/e2.bin", ["e2.bin", ".onnx"]),
    ("export both sizes", "export --model {model} --out {root}/e3.onnx --height 64 --width 80 --dynamic", ["--dynamic", "not both"]),
    ("export height alone", "export --model {model} --out {root}/e4.onnx --height 64", ["--height", "--width"]),
    ("int8 without calibration", "export --model {model} --out {root}/e5.onnx --int8", ["--int8", "--calibration"]),
    ("calibration of other classes", "export --model {model} --out {root}/e6.onnx --int8 --calibration {other_classes}",
     ["--calibration", "other_classes", "classes"]),
    ("onnx file from elsewhere", "eval --model {root}/plain.onnx --data {data}", ["plain.onnx", "no everseg metadata"]),
    ("onnx file missing", "predict --model {root}/gone.onnx --out {root}/p9 {image}", ["gone.onnx", "no such ONNX file"]),
    # distil and compress
    ("student without a backbone", "distill --teacher {model} --student lraspp --data {data} --out {root}/d1",
     ["--student", "ARCH/BACKBONE"]),
    ("student of an unknown architecture", "distill --teacher {model} --student nosuch/mobilenet_v2 --data {data} --out {root}/d2",
     ["nosuch", "architecture"]),
    ("student of an unknown backbone", "distill --teacher {model} --student lraspp/nosuch --data {data} --out {root}/d3",
     ["nosuch", "backbone"]),
    ("teacher missing", "distill --teacher {root}/nope --student lraspp/mobilenet_v2 --data {data} --out {root}/d4",
     ["{root}/nope"]),
    ("distil on data of other classes", "distill --teacher {model} --student lraspp/mobilenet_v2 --data {other_classes} --out {root}/d5",
     ["other_classes", "Himmel", "teacher"]),
    ("distil at temperature 0", "distill --teacher {model} --student lraspp/mobilenet_v2 --data {data} --out {root}/d6 --temperature 0",
     ["--temperature", "positive"]),
    ("distil without data", "distill --teacher {model} --student lraspp/mobilenet_v2 --out {root}/d7",
     ["no --data", "does not record"]),
    ("prune everything", "compress --model {model} --prune 1 --data {data} --out {root}/c1", ["--prune", "between 0 and 1"]),
    ("prune nothing", "compress --model {model} --prune 0 --data {data} --out {root}/c4", ["--prune 0", "removes nothing"]),
    ("prune the whole decoder", "compress --model {model} --prune 0.2 --prune-decoder 1 --data {data} --out {root}/c3",
     ["--prune-decoder", "between 0"]),
    ("prune into the model's folder", "compress --model {model} --prune 0.5 --data {data} --out {model}",
     ["--out", "the model this run starts from"]),
    ("compress an ONNX file", "compress --model {root}/plain.onnx --prune 0.5 --data {data} --out {root}/c2",
     ["plain.onnx", "not a model folder"]),
    # tuning
    ("tune without data", "tune --trials 2 --out {root}/tune1", ["no dataset path", "--data"]),
    ("tune with a missing space", "tune --trials 2 --out {root}/tune2 --data {data} --space {root}/nospace.yaml",
     ["--space", "nospace.yaml", "no such file"]),
    ("tune with an unknown sampler", "tune --trials 2 --out {root}/tune3 --data {data} --sampler bayes",
     ["--sampler", "bayes", "tpe, random, grid"]),
    ("resume a study that is not there", "tune --trials 2 --out {root}/tune4 --data {data} --resume",
     ["--out", "tune4", "no study to resume"]),
    # devices
    ("train on an unknown device", "train --config {cfg} --data {data} --out {root}/dev1 --device gpu",
     ["--device gpu", "unknown device"]),
    ("learn on an unknown device", "learn --model {model} --data {data} --out {root}/dev2 --device tpu",
     ["--device tpu", "unknown device"]),
    ("eval on an unknown device", "eval --model {model} --data {data} --device cuda:x", ["--device cuda:x", "unknown device"]),
    ("an ONNX file on a GPU", "predict {image} --model {root}/plain.onnx --out {root}/p9 --device cuda",
     ["--device cuda", "ONNX file", "CPU"]),
    *([] if torch.cuda.is_available() else [
        ("train on a missing GPU", "train --config {cfg} --data {data} --out {root}/dev3 --device cuda",
         ["cuda", "CUDA is not available"]),
        ("eval on a missing GPU", "eval --model {model} --data {data} --device cuda:0",
         ["--device cuda:0", "CUDA is not available"]),
        ("serve on a missing GPU", "serve --registry {root}/reg9 --model {model} --device cuda",
         ["--device cuda", "CUDA is not available"])]),
    ("serve on an unknown device", "serve --registry {root}/reg8 --model {model} --device gpu",
     ["--device gpu", "unknown device"]),
    # the service
    ("update crop not HxW", "serve --registry {root}/reg1 --update-crop 240", ["--update-crop", "240"]),
    ("update finetune unknown", "serve --registry {root}/reg6 --update-finetune partly", ["--update-finetune", "partly"]),
    ("serve without a model", "serve --registry {root}/reg2", ["--registry", "no model yet", "--model"]),
    ("serve a missing model", "serve --registry {root}/reg3 --model {root}/nomodel", ["nomodel"]),
    ("serve an ONNX file", "serve --registry {root}/reg7 --model {root}/plain.onnx", ["plain.onnx", "model folder"]),
    ("serve a missing holdout", "serve --registry {root}/reg4 --model {model} --holdout {root}/nodata", ["nodata"]),
    ("serve a missing token file", "serve --registry {root}/reg5 --model {model} --token-file {root}/notoken",
     ["--token-file", "notoken"]),
]


@pytest.mark.parametrize("name, argv, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(world, name, argv, words):
    fill = {k: str(v) for k, v in world.items()}
    import shlex

    args = [a.format(**fill) for a in shlex.split(argv)]
    r = runner.invoke(app, args)
    assert r.exit_code != 0, r.output
    line = error_line(r)
    for word in words:
        assert word.format(**fill) in line, (word, line)
    # Nothing was written for a refused training or teaching run.
    for flag in ("--out",):
        if flag in args and args[0] in ("train", "learn", "scenario", "distill", "compress"):
            out = Path(args[args.index(flag) + 1])
            assert out == world["model"] or not out.exists(), out
    if args[0] == "tune":  # a refused study makes no folder
        assert not Path(args[args.index("--out") + 1]).exists()
    if args[0] == "serve":  # a refused start makes no registry
        assert not Path(args[args.index("--registry") + 1]).exists()


def test_unreadable_images_are_reported_and_the_rest_predicted(world, tmp_path):
    r = invoke("predict", "--model", world["model"], "--out", tmp_path / "p", world["image"],
               world["root"] / "text.png", world["root"] / "empty.png", "--no-progress")
    assert r.exit_code == 1
    assert "text.png" in r.output and "empty.png" in r.output and "2 of 3 images could not be read" in r.output
    assert (tmp_path / "p" / f"{world['image'].stem}_mask.png").is_file()


def test_predict_takes_a_folder_and_refuses_to_overwrite_without_being_told(world, tmp_path):
    images = world["data"] / "images"
    r = invoke("predict", "--model", world["model"], "--out", tmp_path / "p", images, "--no-progress")
    assert r.exit_code == 0, r.output
    masks = sorted((tmp_path / "p").glob("*_mask.png"))
    assert len(masks) == len(list(images.glob("*.png")))
    stamp = masks[0].stat().st_mtime_ns
    r = invoke("predict", "--model", world["model"], "--out", tmp_path / "p", images, "--no-progress")
    assert r.exit_code == 2 and "already exist" in error_line(r) and "--overwrite" in r.output
    assert masks[0].stat().st_mtime_ns == stamp
    r = invoke("predict", "--model", world["model"], "--out", tmp_path / "p", images, "--overwrite", "--no-progress")
    assert r.exit_code == 0, r.output


def test_predict_overlay_has_a_legend_and_scales_work(world, tmp_path):
    r = invoke("predict", "--model", world["model"], "--out", tmp_path, world["image"], "--scales", "0.75,1",
               "--flip", "--no-progress")
    assert r.exit_code == 0, r.output
    overlay = np.array(Image.open(tmp_path / f"{world['image'].stem}_overlay.png"))
    mask = np.array(Image.open(tmp_path / f"{world['image'].stem}_mask.png"))
    assert mask.shape == (64, 80)
    assert overlay.shape[1] > 80 and overlay.shape[0] >= 64  # the legend sits right of the picture


def test_threads_option_sets_torch_threads(world):
    before = torch.get_num_threads()
    try:
        r = invoke("eval", "--model", world["model"], "--data", world["data"], "--threads", "1", "--no-progress")
        assert r.exit_code == 0, r.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_version_and_help_read_like_a_tool():
    r = invoke("--version")
    assert r.exit_code == 0 and r.output.startswith("everseg ")
    r = invoke("train", "--help")
    assert r.exit_code == 0 and "<bool>" not in r.output and "--resume / --no-resume" in r.output


@pytest.mark.slow
def test_folder_dataset_without_val_list_trains_and_says_what_it_held_out(world, tmp_path):
    data = tmp_path / "noval"
    shutil.copytree(world["data"], data)
    (data / "test.txt").unlink()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY.replace("  val_split: test\n", ""))
    r = invoke("train", "--config", cfg, "--data", data, "--out", tmp_path / "a", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "has no 'val' split: holding out 1 of its 8 images for validation" in r.output
    r = invoke("train", "--config", cfg, "--data", data, "--out", tmp_path / "b", "--no-progress",
               "--set", "data.val_split=none")
    assert r.exit_code == 0, r.output
    assert "trained 1 epoch in " in r.output and "val mIoU" not in r.output


@pytest.mark.slow
def test_the_shipped_recipe_trains_a_folder_dataset(world, tmp_path):
    recipe = Path(__file__).resolve().parents[1] / "configs" / "camvid.yaml"
    r = invoke("train", "--config", recipe, "--data", world["data"], "--dataset", "folder", "--out", tmp_path / "r",
               "--epochs", "1", "--no-progress", "--set", "data.crop_size=[48,64]", "--set", "model.pretrained=false",
               "--set", "train.batch_size=4", "--set", "train.bf16=off")
    assert r.exit_code == 0, r.output  # trainval = train.txt + val.txt, whichever exist


@pytest.mark.slow
def test_lineage_is_absolute_whatever_the_current_folder(world, tmp_path):
    from everseg.models import load_model

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        r = invoke("scenario", "run", "--protocol", "camvid-6-5", "--strategy", "finetune", "--data", world["data"],
                   "--dataset", "folder", "--out", "sc", "--config", world["cfg"], "--no-progress")
        assert r.exit_code == 0, r.output
    finally:
        os.chdir(cwd)
    meta = load_model(tmp_path / "sc" / "model").metadata
    assert meta["parent"] == str(tmp_path / "sc" / "step0" / "model") and Path(meta["parent"]).is_absolute()
    assert all(Path(p).is_absolute() for p in meta["lineage"])


def test_observe_says_what_it_wants(world, tiny_camvid, tmp_path):
    from everseg.data import open_dataset
    from everseg.learn import OnlineLearner
    from everseg.models import load_model

    holdout = open_dataset(tiny_camvid, dataset="folder", split="test")
    learner = OnlineLearner(load_model(world["model"]), tmp_path / "reg", holdout)
    with pytest.raises(ValueError, match="RGB uint8 H x W x 3"):
        learner.observe(np.zeros((64, 80), np.uint8), np.zeros((64, 80), np.uint8))
    with pytest.raises(ValueError, match="same size"):
        learner.observe(np.zeros((64, 80, 3), np.uint8), np.zeros((60, 80), np.uint8))
    with pytest.raises(ValueError, match=r"mask values \[40\]"):
        learner.observe(np.zeros((64, 80, 3), np.uint8), np.full((64, 80), 40, np.uint8))
