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
SetOpt = Annotated[list[str], typer.Option("--set", help="Override a config field: section.field=value (repeatable)")]
ProgressOpt = Annotated[bool, typer.Option(help="Show progress")]
MemoryOpt = Annotated[int, typer.Option(help="Replay memory budget (images)")]


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
    set_: SetOpt = [],
    progress: ProgressOpt = True,
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
    progress: ProgressOpt = True,
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


scenario_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Incremental-learning scenarios.")
app.add_typer(scenario_app, name="scenario")


ParamOpt = Annotated[list[str], typer.Option(
    "--param", help="Strategy hyper-parameter STRATEGY.NAME=VALUE, e.g. lwf.weight=5 (repeatable)")]


def _strategy_params(items: list[str]) -> dict[str, str]:
    params = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or "." not in key:
            raise ValueError(f"--param {item!r}: expected STRATEGY.NAME=VALUE, e.g. plop.pod_weight=0.02")
        params[key.strip().lower()] = value.strip()
    return params


def _continual_config(config: Optional[Path], set_: list[str], epochs: Optional[int]):
    from everseg.learn import load_config, parse_override

    overrides = dict(parse_override(s) for s in set_)
    if epochs is not None:
        overrides["train.epochs"] = epochs
    overrides.setdefault("data.val_split", None)
    return load_config(config, overrides)


STRATEGY_HELP = ("finetune, ewc, mas, weighting, replay, lwf, ilt, mib, plop, mer or a '+' combination such as "
                 "plop+replay")


@app.command()
def learn(
    model: Annotated[Path, typer.Option(help="The model to teach (model folder or run folder)")],
    data: Annotated[Path, typer.Option(help="Dataset root with the new images")],
    out: Annotated[Path, typer.Option(help="Run folder; the new model is OUT/model")],
    new_classes: Annotated[Optional[str], typer.Option(
        help="Comma-separated class names to add; omit to learn new data of the same classes")] = None,
    strategy: Annotated[Optional[str], typer.Option(
        help=STRATEGY_HELP + " (default: mib for new classes, replay for new data)")] = None,
    dataset: DatasetOpt = None,
    split: Annotated[str, typer.Option(help="Split with the new training images")] = "train",
    test_split: Annotated[str, typer.Option(help="Split to measure old/new classes on")] = "test",
    config: Annotated[Optional[Path], typer.Option(help="YAML config (augmentation, optimiser)")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs over the new images")] = None,
    minutes: Annotated[Optional[float], typer.Option(help="Wall-time budget of the step, in minutes")] = None,
    memory_size: MemoryOpt = 20,
    param: ParamOpt = [],
    set_: SetOpt = [],
    progress: ProgressOpt = True,
) -> None:
    """Teach an existing model new classes or new data; the new model records its parent."""
    from everseg.data import DataError, open_dataset
    from everseg.data.scenarios import align_labels, build_scenario
    from everseg.learn.continual import class_incremental_spec, domain_spec, run_scenario
    from everseg.learn.strategies import default_strategy
    from everseg.workflows import load_trained_model, resolve_model_dir

    try:
        model_dir = resolve_model_dir(model)
        base = load_trained_model(model_dir)
        cfg = _continual_config(config, set_, epochs)
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={
            "arch": base.config.arch, "backbone": base.config.backbone, "output_stride": base.config.output_stride})})
        pool = open_dataset(data, dataset=dataset, split=split)
        test = open_dataset(data, dataset=dataset, split=test_split)
        if new_classes:
            spec = class_incremental_spec(base.label_space.names, [c.strip() for c in new_classes.split(",")])
        else:  # same classes, new data: speak the model's class ids
            spec = domain_spec()
            pool, test = align_labels(pool, base.label_space), align_labels(test, base.label_space)
        scenario = build_scenario(spec, pool, test, base_trained=True)
        strategy = strategy or default_strategy(bool(new_classes))
        report = run_scenario(scenario, strategy, cfg, out, base_model=model_dir, memory_size=memory_size,
                              step_minutes=minutes, params=_strategy_params(param), progress=progress)
    except (DataError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    report.print_table(Console())
    console.print(f"new model: {out / 'model'} (parent: {model_dir})")


@scenario_app.command("run")
def scenario_run(
    data: Annotated[Path, typer.Option(help="Dataset root")],
    out: Annotated[Path, typer.Option(help="Run folder: step models, results.json/.md, plot")],
    protocol: Annotated[Optional[str], typer.Option(help="Built-in protocol, e.g. camvid-6-1, voc-15-1-overlap")] = None,
    scenario: Annotated[Optional[Path], typer.Option(help="Scenario YAML (instead of --protocol)")] = None,
    strategy: Annotated[Optional[str], typer.Option(
        help=STRATEGY_HELP + "; joint retrains on everything (default: mib when steps add classes, "
             "replay when they add data)")] = None,
    dataset: DatasetOpt = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML config (model, augmentation, optimiser)")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs of step 0")] = None,
    step_epochs: Annotated[Optional[int], typer.Option(
        help="Epochs of each later step (default: as step 0; joint always retrains like step 0)")] = None,
    step_minutes: Annotated[Optional[float], typer.Option(
        help="Wall-time budget of each later step (default: train.max_minutes)")] = None,
    base_model: Annotated[Optional[Path], typer.Option(help="A model that already learned step 0")] = None,
    memory_size: MemoryOpt = 20,
    param: ParamOpt = [],
    set_: SetOpt = [],
    progress: ProgressOpt = True,
) -> None:
    """Run every step of a scenario with a strategy and write the continual metrics."""
    from everseg.data import DataError, open_dataset
    from everseg.data.protocols import get_protocol
    from everseg.data.scenarios import ScenarioSpec, build_scenario
    from everseg.learn.continual import run_scenario
    from everseg.learn.strategies import default_strategy

    if (protocol is None) == (scenario is None):
        _fail("give exactly one of --protocol and --scenario")
    try:
        spec = get_protocol(protocol) if protocol else ScenarioSpec.from_yaml(scenario)
        kind = dataset or spec.dataset
        pool = open_dataset(data, dataset=kind, split=spec.train_split)
        test = open_dataset(data, dataset=kind, split=spec.test_split)
        sc = build_scenario(spec, pool, test, base_dir=scenario.parent if scenario else None,
                            base_trained=base_model is not None)
        cfg = _continual_config(config, set_, epochs)
        strategy = strategy or default_strategy(spec.kind == "class")
        report = run_scenario(sc, strategy, cfg, out, step_epochs=step_epochs, step_minutes=step_minutes,
                              base_model=base_model, params=_strategy_params(param), memory_size=memory_size,
                              progress=progress)
    except (DataError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    report.print_table(Console())
    console.print(f"results: {out / 'results.json'}, {out / 'results.md'}, {out / 'iou_across_steps.png'}")


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
