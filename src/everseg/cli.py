"""The ``everseg`` command: a thin layer over the library (see everseg.workflows)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Semantic segmentation that keeps learning.")
data_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Check and fetch datasets.")
app.add_typer(data_app, name="data")
console = Console(stderr=True)

DatasetOpt = Annotated[Optional[str], typer.Option(
    "--dataset", help="camvid | folder | voc | cityscapes | ade20k (default: detect from the layout)")]


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _parse_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.lower().replace("x", ",").split(",")
    if len(parts) != 2:
        _fail(f"size {text!r} must look like HxW, e.g. 360x480")
    return int(parts[0]), int(parts[1])


@app.command()
def train(
    config: Annotated[Optional[Path], typer.Option(help="YAML config (default: built-in defaults)")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Dataset root (overrides data.path)")] = None,
    dataset: DatasetOpt = None,
    epochs: Annotated[Optional[int], typer.Option(help="Overrides train.epochs")] = None,
    out: Annotated[Path, typer.Option(help="Run folder: config, checkpoint, TensorBoard, model/")] = Path("runs/train"),
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run in --out")] = False,
    set_: Annotated[list[str], typer.Option("--set", help="Override a field: section.field=value (repeatable)")] = [],
    progress: Annotated[bool, typer.Option(help="Show progress")] = True,
) -> None:
    """Train a model; the best (or last) model is saved in OUT/model."""
    from everseg.learn import ConfigError, load_config, parse_override, train as run_train

    try:
        overrides = dict(parse_override(s) for s in set_)
        if data is not None:
            overrides["data.path"] = str(data)
        if dataset is not None:
            overrides["data.dataset"] = dataset
        if epochs is not None:
            overrides["train.epochs"] = epochs
        cfg = load_config(config, overrides)
        result = run_train(cfg, out, resume=resume, progress=progress)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    best = f", best val mIoU {result.best_miou:.2f} (epoch {result.best_epoch + 1})" if result.best_miou is not None else ""
    console.print(f"trained {result.epochs_run} epochs in {result.seconds / 60:.1f} min{best}; "
                  f"model: {result.model_dir}")


@app.command("eval")
def eval_(
    model: Annotated[Path, typer.Option(help="Model folder (or a run folder holding model/)")],
    data: Annotated[Path, typer.Option(help="Dataset root")],
    dataset: DatasetOpt = None,
    split: Annotated[str, typer.Option(help="Split to evaluate")] = "test",
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write metrics JSON here")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Folder for plots, overlays and metrics.json")] = None,
    overlays: Annotated[int, typer.Option(help="How many image|truth|prediction overlays to save")] = 8,
    mode: Annotated[str, typer.Option(help="whole | slide")] = "whole",
    crop: Annotated[Optional[str], typer.Option(help="Sliding-window tile HxW")] = None,
    flip: Annotated[bool, typer.Option(help="Flip test-time augmentation")] = False,
    scales: Annotated[str, typer.Option(help="Multi-scale TTA, e.g. 0.75,1,1.25")] = "1.0",
    progress: Annotated[bool, typer.Option(help="Show progress")] = True,
) -> None:
    """Evaluate a model on a dataset split: table, JSON, plots and overlays."""
    from everseg.data import DataError, open_dataset
    from everseg.workflows import evaluate_model, load_trained_model

    try:
        net = load_trained_model(model)
        ds = open_dataset(data, dataset=dataset, split=split)
        evaluate_model(net, ds, out_dir=out, json_path=json_path, overlays=overlays, mode=mode,
                       crop_size=_parse_size(crop), flip=flip,
                       scales=tuple(float(s) for s in scales.split(",")), progress=progress,
                       console=Console())
    except (DataError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    if out is not None:
        console.print(f"plots and overlays in {out}")


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files")],
    model: Annotated[Path, typer.Option(help="Model folder (or a run folder holding model/)")],
    out: Annotated[Path, typer.Option(help="Output folder")] = Path("predictions"),
    mode: Annotated[str, typer.Option(help="whole | slide")] = "whole",
    crop: Annotated[Optional[str], typer.Option(help="Sliding-window tile HxW")] = None,
    flip: Annotated[bool, typer.Option(help="Flip test-time augmentation")] = False,
) -> None:
    """Predict masks: OUT/<stem>_mask.png (class ids, palette PNG) and OUT/<stem>_overlay.png."""
    from everseg.data import DataError
    from everseg.workflows import load_trained_model, predict_files

    try:
        net = load_trained_model(model)
        written = predict_files(net, images, out, mode=mode, crop_size=_parse_size(crop), flip=flip)
    except (DataError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    console.print(f"wrote {len(written)} masks and overlays to {out}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Run folder")] = Path("runs/demo"),
    epochs: Annotated[Optional[int], typer.Option(help="Override the demo's epochs")] = None,
) -> None:
    """Fine-tune ImageNet MobileNetV2 on the embedded CamVid sample, evaluate it, draw overlays."""
    from everseg.data import open_dataset
    from everseg.learn import load_config, train as run_train
    from everseg.samples import SAMPLES_DIR, camvid_mini
    from everseg.workflows import evaluate_model, load_trained_model

    overrides: dict = {"data.path": str(camvid_mini())}
    if epochs is not None:
        overrides["train.epochs"] = epochs
    cfg = load_config(SAMPLES_DIR / "demo.yaml", overrides)
    console.print(f"training {cfg.model.arch}/{cfg.model.backbone} on {camvid_mini()} "
                  f"for {cfg.train.epochs} epochs -> {out}")
    result = run_train(cfg, out)
    test = open_dataset(camvid_mini(), dataset="folder", split="test")
    report = out / "report"
    evaluate_model(load_trained_model(result.model_dir), test, out_dir=report,
                   json_path=report / "metrics.json", overlays=20, console=Console())
    console.print(f"\nmodel:    {result.model_dir}\nmetrics:  {report / 'metrics.json'}\n"
                  f"plots:    {report / 'per_class_iou.png'}, {report / 'confusion_matrix.png'}\n"
                  f"overlays: {report / 'overlays'}/")


@data_app.command("check")
def data_check(
    path: Annotated[Path, typer.Argument(help="Dataset root")],
    dataset: DatasetOpt = None,
) -> None:
    """Validate every image/mask pair and print class pixel frequencies; exit 1 on problems."""
    from everseg.data import DataError, check_dataset
    from everseg.data.check import print_report

    try:
        report = check_dataset(path, dataset=dataset)
    except (DataError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc), code=1)
    print_report(report, Console())
    if not report.ok:
        raise typer.Exit(1)


@data_app.command("fetch")
def data_fetch(
    name: Annotated[str, typer.Argument(help="Dataset to download (camvid)")],
    dest: Annotated[Path, typer.Option(help="Where to put it")] = Path("data"),
) -> None:
    """Download a public dataset (needs internet) and verify it."""
    from everseg.data import fetch_dataset

    try:
        where = fetch_dataset(name, dest)
    except Exception as exc:  # network errors come in many types; all end the same way for the user
        _fail(str(exc), code=1)
    console.print(f"{name} is in {where}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
