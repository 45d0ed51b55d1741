"""The ``everseg`` command: a thin layer over the library (see everseg.workflows).

Every command's errors end the same way, in :class:`_Commands.invoke`: one line on stderr
naming the input and the problem, exit code 2 (1 for ``data check``), never a traceback.
``EVERSEG_DEBUG=1`` shows the traceback of an unexpected error.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

try:  # typer 0.2x carries its own copy of click
    from typer._click import exceptions as _click_errors
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click import exceptions as _click_errors

# What the command line machinery raises on purpose (usage errors, exit codes); typer's
# Exit and Abort are RuntimeErrors, so they must pass before bad input is caught.
_CLI_SIGNALS = (typer.Exit, typer.Abort, _click_errors.ClickException,
                *(getattr(_click_errors, n) for n in ("Exit", "Abort") if hasattr(_click_errors, n)))

# soft_wrap: an error message is one line in a log however long its paths are (rich would
# otherwise break it at 80 columns when stderr is not a terminal).
console = Console(stderr=True, soft_wrap=True, highlight=False, emoji=False)


def _fail(message: str, code: int = 2) -> typer.Exit:
    console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def _message(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{exc.filename}: {exc.strerror or text}"
    elif isinstance(exc, OSError) and exc.filename and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    return text


class _Commands(TyperGroup):
    """Runs a command and turns what it raises into one clear line."""

    def invoke(self, ctx: typer.Context) -> Any:
        _log_to_stderr()
        try:
            return super().invoke(ctx)
        except _CLI_SIGNALS:
            raise
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except (ValueError, OSError, RuntimeError) as exc:  # bad input: data, config, paths
            if os.environ.get("EVERSEG_DEBUG"):
                raise
            _fail(_message(exc), getattr(ctx.find_root(), "error_code", 2))
        except Exception as exc:  # a bug: still one line, the traceback on request
            if os.environ.get("EVERSEG_DEBUG"):
                raise
            _fail(f"internal error ({type(exc).__name__}: {exc}); rerun with EVERSEG_DEBUG=1 for the "
                  "traceback and please report it", 3)


class _StderrLines(logging.Handler):
    """The library's messages (``everseg`` logger) as plain lines on the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        prefix = "warning: " if record.levelno >= logging.WARNING else ""
        console.print(escape(prefix + record.getMessage()))


def _main_process() -> bool:
    """False in the processes torchrun started besides process 0: they report only problems."""
    return os.environ.get("RANK", "0") == "0"


def _log_to_stderr() -> None:
    logger = logging.getLogger("everseg")
    if not any(isinstance(h, _StderrLines) for h in logger.handlers):
        logger.addHandler(_StderrLines())
        logger.setLevel(logging.INFO if _main_process() else logging.WARNING)


def _typer(help: str) -> typer.Typer:
    # rich_markup_mode=None: click's plain help, which shows flags as --resume / --no-resume
    # (the rich help of typer 0.29 printed "<bool>" after every flag, --help included).
    return typer.Typer(add_completion=False, no_args_is_help=True, help=help, cls=_Commands,
                       rich_markup_mode=None)


app = _typer("Semantic segmentation that keeps learning.")
data_app = _typer("Check and fetch datasets.")
app.add_typer(data_app, name="data")
scenario_app = _typer("Incremental-learning scenarios.")
app.add_typer(scenario_app, name="scenario")


def _version(value: bool) -> None:
    if value:
        from everseg import __version__

        typer.echo(f"everseg {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit")] = False) -> None:
    """Semantic segmentation that keeps learning."""


DatasetOpt = Annotated[Optional[str], typer.Option(
    "--dataset", help="camvid | folder | voc | cityscapes | ade20k (default: detect from the layout)")]
SetOpt = Annotated[list[str], typer.Option("--set", help="Override a config field: section.field=value (repeatable)")]
ProgressOpt = Annotated[bool, typer.Option(help="Show progress")]
MemoryOpt = Annotated[int, typer.Option(min=0, help="Replay memory budget (images)")]
NprocOpt = Annotated[Optional[int], typer.Option(
    min=1, help="Train data-parallel in N processes on this machine (runs torchrun; one per GPU, "
                "or CPU cores shared out)")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace the run already in --out")]
ThreadsOpt = Annotated[Optional[int], typer.Option(
    min=1, help="Torch threads (default: one per core; fewer is faster when other work shares the machine)")]
DeviceOpt = Annotated[Optional[str], typer.Option(
    help="auto | cpu | cuda | cuda:N | mps; auto = CUDA when present (default: train.device of the config, auto)")]
InferDeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps; auto = CUDA when present")]
ScalesOpt = Annotated[str, typer.Option(help="Multi-scale test-time augmentation, e.g. 0.75,1,1.25")]
CropOpt = Annotated[Optional[str], typer.Option(help="Sliding-window tile HxW, e.g. 360x480")]
ModeOpt = Annotated[str, typer.Option(help="whole | slide")]
ParamOpt = Annotated[list[str], typer.Option(
    "--param", help="Strategy hyper-parameter STRATEGY.NAME=VALUE, e.g. lwf.weight=5 (repeatable)")]
STRATEGY_HELP = ("finetune, ewc, mas, weighting, replay, lwf, ilt, mib, plop, mer, reptile, ewf or a '+' combination such "
                 "as plop+replay or mib+ewf")


def _parse_size(text: str | None, option: str = "--crop") -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.lower().replace("x", ",").split(",")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"{option} {text!r}: expected HxW in pixels, e.g. 360x480") from None
    if h < 1 or w < 1:
        raise ValueError(f"{option} {text!r}: both sides must be positive")
    return h, w


def _parse_scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(s) for s in text.split(","))
    except ValueError:
        raise ValueError(f"--scales {text!r}: expected comma-separated positive numbers, e.g. 0.75,1,1.25") from None
    if not all(0 < s < float("inf") for s in scales):
        raise ValueError(f"--scales {text!r}: every scale must be a positive number")
    return scales


def _overrides(set_: list[str], **options: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """``--set`` overrides and command options (``{"train.epochs": ("--epochs", 3)}``) as config
    overrides, with the option that gave each (what an invalid value is reported under)."""
    from everseg.learn import parse_override

    overrides: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for text in set_:
        key, value = parse_override(text)
        overrides[key], labels[key] = value, f"--set {text}"
    for key, given in options.items():
        if given is not None:
            flag, value = given
            if value is not None:
                overrides[key], labels[key] = value, f"{flag} {value}"
    return overrides, labels


def _config(config: Optional[Path], set_: list[str], **options: Any):
    """Load a config with ``--set`` overrides and command options; see :func:`_overrides`."""
    from everseg.learn import load_config

    overrides, labels = _overrides(set_, **options)
    return load_config(config, overrides, labels=labels)


def _torchrun(nproc: int) -> int:
    """``everseg train --nproc N ...`` = ``torchrun --standalone --nproc-per-node N -m everseg train ...``."""
    import subprocess

    from everseg.learn.distributed import launched_by_torchrun

    if launched_by_torchrun():
        raise ValueError("--nproc: this process was already started by torchrun; leave --nproc out")
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "everseg", *args]
    console.print(f"running: {' '.join(cmd[1:])}")
    return subprocess.run(cmd).returncode


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@app.command()
def train(
    config: Annotated[Optional[Path], typer.Option(help="YAML config (default: built-in defaults)")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Dataset root (overrides data.path)")] = None,
    dataset: DatasetOpt = None,
    epochs: Annotated[Optional[int], typer.Option(help="Overrides train.epochs")] = None,
    out: Annotated[Path, typer.Option(help="Run folder: config, checkpoint, TensorBoard, model/")] = Path("runs/train"),
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run in --out")] = False,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = None,
    nproc: NprocOpt = None,
    set_: SetOpt = [],
    progress: ProgressOpt = True,
) -> None:
    """Train a model; the best (or last) model is saved in OUT/model."""
    from everseg.learn import train as run_train

    cfg = _config(config, set_, **{"data.path": ("--data", None if data is None else str(data)),
                                   "data.dataset": ("--dataset", dataset), "train.epochs": ("--epochs", epochs),
                                   "train.device": ("--device", device)})
    if nproc is not None and nproc > 1:
        from everseg.learn.distributed import check_data_parallel

        # Refused here, not in every started process: one message, at once.
        check_data_parallel(cfg.train.batch_size, cfg.train.finetune, nproc)
        raise typer.Exit(_torchrun(nproc))
    result = run_train(cfg, out, resume=resume, overwrite=overwrite, progress=progress)
    if not _main_process():
        return  # under torchrun process 0 reports for all
    best = (f", best val mIoU {result.best_miou:.2f} (epoch {result.best_epoch + 1})"
            if result.best_miou is not None else "")
    console.print(f"trained {_plural(result.epochs_run, 'epoch')} in {_minutes(result.train_seconds)}{best}; "
                  f"model: {result.model_dir}")


@app.command("eval")
def eval_(
    model: Annotated[Path, typer.Option(help="Model folder (or a run folder holding model/), or an exported .onnx file")],
    data: Annotated[Path, typer.Option(help="Dataset root")],
    dataset: DatasetOpt = None,
    split: Annotated[str, typer.Option(help="Split to evaluate")] = "test",
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write metrics JSON here")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Folder for plots, overlays and metrics.json")] = None,
    overlays: Annotated[int, typer.Option(min=0, help="How many image|truth|prediction overlays to save")] = 8,
    mode: ModeOpt = "whole",
    crop: CropOpt = None,
    flip: Annotated[bool, typer.Option(help="Flip test-time augmentation")] = False,
    scales: ScalesOpt = "1.0",
    threads: ThreadsOpt = None,
    device: InferDeviceOpt = "cpu",
    progress: ProgressOpt = True,
) -> None:
    """Evaluate a model on a dataset split: table, JSON, plots and overlays (scores in percent)."""
    from everseg.data import open_dataset
    from everseg.workflows import evaluate_model, load_trained_model, set_threads

    crop_size, scale_list = _parse_size(crop), _parse_scales(scales)
    set_threads(threads)
    net = load_trained_model(model, device=device)
    ds = open_dataset(data, dataset=dataset, split=split)
    evaluate_model(net, ds, out_dir=out, json_path=json_path, overlays=overlays, mode=mode,
                   crop_size=crop_size, flip=flip, scales=scale_list, progress=progress,
                   console=Console(soft_wrap=True, emoji=False))
    if out is not None:
        console.print(f"plots and overlays in {out}")


@app.command()
def export(
    model: Annotated[Path, typer.Option(help="Model folder (or a run folder holding model/)")],
    out: Annotated[Path, typer.Option(help="ONNX file to write (FILE.onnx)")],
    height: Annotated[Optional[int], typer.Option(help="Fixed input height (with --width)")] = None,
    width: Annotated[Optional[int], typer.Option(help="Fixed input width (with --height)")] = None,
    dynamic: Annotated[bool, typer.Option(help="Any input size (the default without --height/--width)")] = False,
    int8: Annotated[bool, typer.Option(help="Static int8 quantisation (needs --calibration)")] = False,
    calibration: Annotated[Optional[Path], typer.Option(help="Labelled data whose images calibrate --int8")] = None,
    dataset: DatasetOpt = None,
    split: Annotated[str, typer.Option(help="Split of --calibration")] = "train",
    calibration_images: Annotated[int, typer.Option(min=1, help="Calibration images")] = 32,
    check_images: Annotated[int, typer.Option(min=1, help="Images of the parity check")] = 4,
    min_agreement: Annotated[Optional[float], typer.Option(
        help="Smallest share of pixels whose class must match PyTorch's (default 0.995, 0.99 with --int8: convolutions that cost agreement stay in float)")] = None,
    threads: ThreadsOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists")] = False,
) -> None:
    """Export a model to ONNX (classes, normalisation and layout in its metadata), checked against PyTorch."""
    from everseg.workflows import export_model, set_threads

    set_threads(threads)
    report = export_model(model, out, height=height, width=width, dynamic=dynamic, int8=int8,
                          calibration=calibration, dataset=dataset, split=split,
                          calibration_images=calibration_images, check_images=check_images,
                          min_agreement=min_agreement, overwrite=overwrite)
    size = f"{report.input_size[0]}x{report.input_size[1]}" if report.input_size else "any size"
    for line in report.kept_float:
        console.print(f"kept in float: {escape(line)}")
    console.print(f"wrote {report.path} ({report.path.stat().st_size / 2**20:.1f} MB, {size}{', int8' if int8 else ''}); "
                  f"ONNX Runtime agrees with PyTorch on {100 * report.agreement:.2f} % of the pixels of "
                  f"{report.checked_images} check images")


TemperatureOpt = Annotated[float, typer.Option(help="Temperature of the pixel-wise KL term")]
KdWeightOpt = Annotated[float, typer.Option(help="Weight of the pixel-wise KL term (0: off)")]
ChannelWeightOpt = Annotated[float, typer.Option(
    help="Weight of the channel-wise distillation term (CWD; 0: off)")]
ChannelTemperatureOpt = Annotated[float, typer.Option(help="Temperature of the channel-wise term")]


def _recipe(config: Optional[Path], teacher: Path, set_: list[str], data: Optional[Path], dataset: Optional[str],
            epochs: Optional[int], device: Optional[str]):
    """``--config``, else the config the teacher was trained with (its run folder's), else the defaults."""
    from everseg.deploy.distill import teacher_recipe

    if config is None:
        config = teacher_recipe(teacher)
        if config is not None and _main_process():
            console.print(f"recipe: {config}, the config {teacher} was trained with (--config to choose another)")
    return _config(config, set_, **{"data.path": ("--data", None if data is None else str(data)),
                                    "data.dataset": ("--dataset", dataset), "train.epochs": ("--epochs", epochs),
                                    "train.device": ("--device", device)})


def _trained(result: Any) -> None:
    if not _main_process():
        return
    best = (f", best val mIoU {result.best_miou:.2f} (epoch {result.best_epoch + 1})"
            if result.best_miou is not None else "")
    console.print(f"trained {_plural(result.epochs_run, 'epoch')} in {_minutes(result.train_seconds)}{best}; "
                  f"model: {result.model_dir}")


@app.command()
def distill(
    teacher: Annotated[Path, typer.Option(help="The trained model that teaches (model or run folder)")],
    student: Annotated[str, typer.Option(help="Student architecture ARCH/BACKBONE, e.g. lraspp/mobilenet_v2")],
    out: Annotated[Path, typer.Option(help="Run folder of the student: config, checkpoint, model/")],
    data: Annotated[Optional[Path], typer.Option(help="Training data (default: the teacher's)")] = None,
    dataset: DatasetOpt = None,
    config: Annotated[Optional[Path], typer.Option(
        help="YAML config (default: the one the teacher was trained with, else built-in defaults)")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Overrides train.epochs")] = None,
    temperature: TemperatureOpt = 1.0,
    kd_weight: KdWeightOpt = 1.0,
    channel_weight: ChannelWeightOpt = 3.0,
    channel_temperature: ChannelTemperatureOpt = 4.0,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run in --out")] = False,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = None,
    set_: SetOpt = [],
    progress: ProgressOpt = True,
) -> None:
    """Train a smaller student model taught by the labels and by a trained teacher's predictions."""
    from everseg.deploy.distill import distill_model

    cfg = _recipe(config, teacher, set_, data, dataset, epochs, device)
    _trained(distill_model(teacher, student, cfg, out, temperature=temperature, weight=kd_weight,
                           channel_weight=channel_weight, channel_temperature=channel_temperature,
                           resume=resume, overwrite=overwrite, progress=progress))


@app.command()
def tune(
    trials: Annotated[int, typer.Option(min=1, help="Finished trials the study ends with (counted over --resume)")],
    out: Annotated[Path, typer.Option(help="Study folder: study.db, trials/, best.yaml, trials.csv/.md, plots")],
    config: Annotated[Optional[Path], typer.Option(help="YAML config the trials start from (default: built-in defaults)")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Dataset root (overrides data.path)")] = None,
    dataset: DatasetOpt = None,
    minutes: Annotated[Optional[float], typer.Option(help="Each trial's time budget (train.max_minutes)")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Each trial's epochs (train.epochs)")] = None,
    space: Annotated[Optional[Path], typer.Option(
        help="Search space YAML (default: the shipped CamVid space, everseg/learn/tune_space.yaml)")] = None,
    sampler: Annotated[str, typer.Option(help="tpe | random | grid (grid: every field a list of choices)")] = "tpe",
    pruner: Annotated[str, typer.Option(help="median | hyperband | none: stop trials that fall behind")] = "median",
    journal: Annotated[bool, typer.Option(
        help="Keep the study in a journal file that several workers can share (start the others with --resume)")] = False,
    resume: Annotated[bool, typer.Option(help="Continue the study in --out (or join it as another worker)")] = False,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the sampler")] = 0,
    device: DeviceOpt = None,
    set_: SetOpt = [],
    progress: ProgressOpt = False,
) -> None:
    """Search hyper-parameters with Optuna; each trial trains a model. Writes best.yaml for everseg train --config."""
    from everseg.learn.tune import tune as run_tune

    overrides, labels = _overrides(set_, **{"data.path": ("--data", None if data is None else str(data)),
                                            "data.dataset": ("--dataset", dataset),
                                            "train.epochs": ("--epochs", epochs),
                                            "train.device": ("--device", device)})
    report = run_tune(config, out, trials=trials, overrides=overrides, labels=labels, minutes=minutes, space=space,
                      sampler=sampler, pruner=pruner, journal=journal, resume=resume, seed=seed, progress=progress)
    # The Markdown table as written: a rich table would cut the parameters' names to fit 80 columns.
    typer.echo(report.files["trials.md"].read_text(), nl=False)
    if report.best_trial is None:
        console.print("no trial finished")
    else:
        console.print(f"best: trial {report.best_trial}, validation mIoU {report.best_value:.2f}; "
                      f"config: {report.files['best.yaml']} (everseg train --config {report.files['best.yaml']})")
    console.print(f"trials: {report.files['trials.md']}; plots: "
                  f"{', '.join(str(p) for k, p in report.files.items() if k.endswith('.png')) or 'none yet'}")


@app.command()
def compress(
    model: Annotated[Path, typer.Option(help="The trained model to compress (model or run folder)")],
    prune: Annotated[float, typer.Option(help="Share of each layer's channels to remove, e.g. 0.4")],
    out: Annotated[Path, typer.Option(help="Run folder of the pruned model: config, checkpoint, model/")],
    prune_decoder: Annotated[Optional[float], typer.Option(
        help="Share of the decoder's channels to remove instead of --prune's, e.g. 0.6 with --prune 0.2")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Fine-tuning data (default: the model's training data)")] = None,
    dataset: DatasetOpt = None,
    config: Annotated[Optional[Path], typer.Option(
        help="YAML config (default: the one the model was trained with, else built-in defaults)")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Overrides train.epochs")] = None,
    temperature: TemperatureOpt = 1.0,
    kd_weight: KdWeightOpt = 1.0,
    channel_weight: ChannelWeightOpt = 0.0,
    channel_temperature: ChannelTemperatureOpt = 4.0,
    resume: Annotated[bool, typer.Option(help="Continue the interrupted run in --out")] = False,
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = None,
    set_: SetOpt = [],
    progress: ProgressOpt = True,
) -> None:
    """Prune a model's channels, then fine-tune it with the unpruned model as its teacher."""
    from everseg.deploy.distill import compress_model

    cfg = _recipe(config, model, set_, data, dataset, epochs, device)
    _trained(compress_model(model, prune, cfg, out, prune_decoder=prune_decoder, temperature=temperature, weight=kd_weight,
                            channel_weight=channel_weight, channel_temperature=channel_temperature,
                            resume=resume, overwrite=overwrite, progress=progress))


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files, or folders of images")],
    model: Annotated[Path, typer.Option(help="Model folder (or a run folder holding model/), or an exported .onnx file")],
    out: Annotated[Path, typer.Option(help="Output folder")] = Path("predictions"),
    mode: ModeOpt = "whole",
    crop: CropOpt = None,
    flip: Annotated[bool, typer.Option(help="Flip test-time augmentation")] = False,
    scales: ScalesOpt = "1.0",
    threads: ThreadsOpt = None,
    device: InferDeviceOpt = "cpu",
    overwrite: Annotated[bool, typer.Option(help="Replace predictions already in --out")] = False,
    progress: ProgressOpt = True,
) -> None:
    """Predict masks: OUT/<stem>_mask.png (class ids, palette PNG) and OUT/<stem>_overlay.png (with a legend).

    Images over 2.5 megapixels are predicted in 1024x1024 tiles, so memory stays bounded.
    """
    from everseg.workflows import load_trained_model, predict_files, set_threads

    crop_size, scale_list = _parse_size(crop), _parse_scales(scales)
    set_threads(threads)
    net = load_trained_model(model, device=device)

    def on_image(i: int, n: int, path: Path) -> None:
        if progress:
            console.print(f"[{i + 1}/{n}] {path}")

    def on_tile(done: int, total: int) -> None:
        if progress and (done == total or done % max(1, total // 10) == 0):
            console.print(f"  tile {done}/{total}")

    report = predict_files(net, images, out, mode=mode, crop_size=crop_size, flip=flip, scales=scale_list,
                           overwrite=overwrite, on_image=on_image, on_tile=on_tile)
    for path, problem in report.failed:
        console.print(f"[bold red]error:[/] {escape(problem if str(path) in problem else f'{path}: {problem}')}")
    console.print(f"wrote {_plural(len(report.written), 'mask')} and overlays to {out}")
    if report.failed:
        _fail(f"{len(report.failed)} of {len(report.failed) + len(report.written)} images could not be read "
              "(listed above)", 1)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Run folder")] = Path("runs/demo"),
    epochs: Annotated[Optional[int], typer.Option(help="Override the demo's epochs")] = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Fine-tune ImageNet MobileNetV2 on the embedded CamVid sample, evaluate it, draw overlays."""
    from everseg.workflows import run_demo

    result, report = run_demo(out, epochs=epochs, overwrite=overwrite, console=Console(soft_wrap=True, emoji=False))
    console.print(f"\nmodel:    {result.model_dir}\nmetrics:  {report / 'metrics.json'}\n"
                  f"plots:    {report / 'per_class_iou.png'}, {report / 'confusion_matrix.png'}\n"
                  f"overlays: {report / 'overlays'}/")


def _strategy_params(items: list[str]) -> dict[str, str]:
    params = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or "." not in key:
            raise ValueError(f"--param {item!r}: expected STRATEGY.NAME=VALUE, e.g. plop.pod_weight=0.02")
        params[key.strip().lower()] = value.strip()
    return params


def _continual_config(config: Optional[Path], set_: list[str], epochs: Optional[int], device: Optional[str]):
    # Scenario steps are measured on the test split: no validation split unless one is set.
    return _config(config, ["data.val_split=none", *set_], **{"train.epochs": ("--epochs", epochs),
                                                              "train.device": ("--device", device)})


@app.command()
def learn(
    model: Annotated[Path, typer.Option(help="The model to teach (model folder or run folder)")],
    data: Annotated[Path, typer.Option(help="Dataset root with the new images")],
    out: Annotated[Path, typer.Option(help="Run folder; the new model is OUT/model")],
    new_classes: Annotated[Optional[str], typer.Option(
        help="Comma-separated class names to add; omit to learn new data of the same classes")] = None,
    strategy: Annotated[Optional[str], typer.Option(
        help=STRATEGY_HELP + " (default: mib for new classes, reptile+replay for new data)")] = None,
    dataset: DatasetOpt = None,
    split: Annotated[str, typer.Option(help="Split with the new training images")] = "train",
    test_split: Annotated[str, typer.Option(help="Split to measure old/new classes on")] = "test",
    base_data: Annotated[Optional[Path], typer.Option(
        help="The data the model learned from, to fill an empty replay memory (default: what the model records)")
    ] = None,
    base_dataset: Annotated[Optional[str], typer.Option(help="--dataset of --base-data")] = None,
    base_split: Annotated[str, typer.Option(help="Split of --base-data")] = "train",
    config: Annotated[Optional[Path], typer.Option(help="YAML config (augmentation, optimiser)")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs over the new images")] = None,
    minutes: Annotated[Optional[float], typer.Option(
        help="Wall-time budget of the step, in minutes (default, without --epochs: a tenth of the time the "
             "model took to learn, at least 1)")] = None,
    memory_size: MemoryOpt = 20,
    param: ParamOpt = [],
    device: DeviceOpt = None,
    nproc: NprocOpt = None,
    set_: SetOpt = [],
    overwrite: OverwriteOpt = False,
    resume: Annotated[bool, typer.Option(help="Go on with the interrupted run in --out")] = False,
    progress: ProgressOpt = True,
) -> None:
    """Teach an existing model new classes or new data; the new model records its parent."""
    from everseg.workflows import DataSource, parse_class_names, resolve_model_dir, teach

    if nproc is not None and nproc > 1:
        raise typer.Exit(_torchrun(nproc))

    names = parse_class_names(new_classes) if new_classes is not None else None
    if minutes is not None and not 0 < minutes < float("inf"):
        raise ValueError(f"--minutes {minutes}: must be a positive number")
    source = DataSource(str(base_data), base_dataset, base_split) if base_data is not None else None
    report = teach(model, data, out, new_classes=names, strategy=strategy, dataset=dataset, split=split,
                   test_split=test_split, config=_continual_config(config, set_, epochs, device), epochs=epochs,
                   minutes=minutes,
                   memory_size=memory_size, params=_strategy_params(param), base_data=source,
                   overwrite=overwrite, resume=resume, progress=progress)
    if not _main_process():
        return  # under torchrun process 0 reports for all
    report.print_table(Console(soft_wrap=True, emoji=False))
    console.print(f"new model: {out / 'model'} (parent: {resolve_model_dir(model).resolve()})")


@scenario_app.command("run")
def scenario_run(
    data: Annotated[Path, typer.Option(help="Dataset root")],
    out: Annotated[Path, typer.Option(help="Run folder: step models, results.json/.md, plot")],
    protocol: Annotated[Optional[str], typer.Option(help="Built-in protocol, e.g. camvid-6-1, voc-15-1-overlap")] = None,
    scenario: Annotated[Optional[Path], typer.Option(help="Scenario YAML (instead of --protocol)")] = None,
    strategy: Annotated[Optional[str], typer.Option(
        help=STRATEGY_HELP + "; joint retrains on everything (default: mib when steps add classes, "
             "reptile+replay when they add data)")] = None,
    dataset: DatasetOpt = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML config (model, augmentation, optimiser)")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs of step 0")] = None,
    step_epochs: Annotated[Optional[int], typer.Option(
        min=1, help="Epochs of each later step (default: as step 0; joint always retrains like step 0)")] = None,
    step_minutes: Annotated[Optional[float], typer.Option(
        help="Wall-time budget of each later step (default, without --step-epochs: a tenth of step 0's "
             "time, at least 1 minute)")] = None,
    base_model: Annotated[Optional[Path], typer.Option(help="A model that already learned step 0")] = None,
    memory_size: MemoryOpt = 20,
    param: ParamOpt = [],
    device: DeviceOpt = None,
    nproc: NprocOpt = None,
    set_: SetOpt = [],
    overwrite: OverwriteOpt = False,
    resume: Annotated[bool, typer.Option(
        help="Go on with the interrupted run in --out: finished steps are kept")] = False,
    progress: ProgressOpt = True,
) -> None:
    """Run every step of a scenario with a strategy and write the continual metrics."""
    from everseg.workflows import run_named_scenario

    if nproc is not None and nproc > 1:
        raise typer.Exit(_torchrun(nproc))

    if step_minutes is not None and not 0 < step_minutes < float("inf"):
        raise ValueError(f"--step-minutes {step_minutes}: must be a positive number")
    report = run_named_scenario(data, out, protocol=protocol, scenario=scenario, strategy=strategy,
                                dataset=dataset, config=_continual_config(config, set_, epochs, device),
                                step_epochs=step_epochs, step_minutes=step_minutes, base_model=base_model,
                                memory_size=memory_size, params=_strategy_params(param), overwrite=overwrite,
                                resume=resume, progress=progress)
    if not _main_process():
        return  # under torchrun process 0 reports for all
    report.print_table(Console(soft_wrap=True, emoji=False))
    console.print(f"results: {out / 'results.json'}, {out / 'results.md'}, {out / 'iou_across_steps.png'}")


models_app = _typer("Model versions of a registry (what `everseg serve` serves); safe while it runs.")
app.add_typer(models_app, name="models")
RegistryOpt = Annotated[Path, typer.Option(help="Registry folder (everseg serve --registry)")]


def _open_registry(registry: Path):
    from everseg.models.versions import ModelRegistry

    if not (registry / "registry.db").is_file() and not (registry / "registry.json").is_file():
        raise FileNotFoundError(f"--registry {registry}: no model registry here (no registry.db)")
    return ModelRegistry(registry)


@models_app.command("list")
def models_list(registry: RegistryOpt) -> None:
    """Every version: parent, status, holdout and feedback mIoU, what produced it; * = active."""
    from rich.table import Table

    from everseg.serve.app import model_summary
    from everseg.serve.feedback import FeedbackStore

    reg = _open_registry(registry)
    store = FeedbackStore(registry)
    table = Table()
    for col in ("", "version", "parent", "status", "holdout mIoU", "feedback mIoU", "created", "produced by"):
        table.add_column(col)
    fmt = lambda x: "–" if x is None else f"{x:.1f}"  # noqa: E731
    import datetime

    for v in reg.versions():
        s = model_summary(v, store)
        created = datetime.datetime.fromtimestamp(s["created"]).strftime("%Y-%m-%d %H:%M:%S")
        status = s["status"] + (f" ({s['reason']})" if s["reason"] else "")
        table.add_row("*" if s["active"] else "", str(s["version"]), str(s["parent"] or "–"), status,
                      fmt(s["holdout_miou"]), fmt(s["feedback_miou"]), created, s["produced_by"])
    Console(soft_wrap=True, emoji=False).print(table)


@models_app.command("activate")
def models_activate(version: Annotated[int, typer.Argument(help="Version to serve")], registry: RegistryOpt) -> None:
    """Serve VERSION (a running server follows within a second)."""
    _open_registry(registry).activate(version, reason="activated with everseg models activate")
    console.print(f"version {version} is active")


@models_app.command("rollback")
def models_rollback(registry: RegistryOpt,
                    to: Annotated[Optional[int], typer.Option(help="Version to go back to (default: the parent)")] = None
                    ) -> None:
    """Serve the active version's parent (or --to VERSION) again."""
    version = _open_registry(registry).rollback(to, reason="rolled back with everseg models rollback")
    console.print(f"version {version} is active")


@app.command()
def serve(
    registry: RegistryOpt,
    model: Annotated[Optional[Path], typer.Option(help="Model to publish as version 1 when the registry is empty")] = None,
    holdout: Annotated[Optional[Path], typer.Option(help="Labelled data every update is checked on (no learning without it)")] = None,
    dataset: DatasetOpt = None,
    split: Annotated[str, typer.Option(help="Split of --holdout")] = "val",
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port")] = 8000,
    token_file: Annotated[Optional[Path], typer.Option(help="File holding the bearer token (default: REGISTRY/token, made when missing)")] = None,
    tolerance: Annotated[float, typer.Option(min=0, help="Largest holdout mIoU drop (points) an update may cause")] = 1.0,
    new_class_examples: Annotated[int, typer.Option(min=1, help="Corrections per new class before it is taught")] = 3,
    rollback_window: Annotated[int, typer.Option(min=1, help="Corrections per version the automatic rollback compares")] = 10,
    rollback_margin: Annotated[float, typer.Option(min=0, help="Feedback mIoU points below the parent that roll a version back")] = 5.0,
    max_queued: Annotated[int, typer.Option(min=1, help="Feedback items waiting at most (429 above)")] = 100,
    max_upload_mb: Annotated[float, typer.Option(min=0.1, help="Largest upload (413 above)")] = 20.0,
    max_megapixels: Annotated[float, typer.Option(min=0.01, help="Largest image (413 above)")] = 25.0,
    update_crop: Annotated[Optional[str], typer.Option(
        help="Train each update on a random HxW crop, e.g. 240x320: faster updates, fewer accepted "
             "(default: whole images)")] = None,
    update_finetune: Annotated[str, typer.Option(
        help="What an update trains: frozen (decoder and classifier; backbone features reused: fast) "
             "or full (the whole model: about 3x slower)")] = "frozen",
    update_steps: Annotated[int, typer.Option(min=1, help="Gradient steps per correction")] = 3,
    update_replay: Annotated[int, typer.Option(min=1, help="Remembered images replayed beside each correction")] = 2,
    update_nice: Annotated[int, typer.Option(
        min=0, max=19, help="CPU priority of updates below predictions' (0 = the same, 19 = the lowest)")] = 5,
    update_threads: Annotated[Optional[int], typer.Option(
        min=1, help="Torch threads of the update worker (default: every core while the rest of the machine "
                    "leaves them free, half of them while it does not: updates learn more under load)")] = None,
    predict_workers: Annotated[Optional[int], typer.Option(
        min=1, help="Predictions computed at once, the cores split between them (default: 2 on a CPU "
                    "with 2 cores or more: more requests a second under load; 1: the fastest single request)")] = None,
    device: InferDeviceOpt = "auto",
) -> None:
    """Serve predictions, learn from corrections (checked on --holdout), keep versions; see the README."""
    from everseg.serve.service import run_service
    from everseg.serve.worker import WorkerSettings

    crop = _parse_size(update_crop, "--update-crop")
    if update_finetune not in ("full", "frozen"):
        raise ValueError(f"--update-finetune {update_finetune!r}: expected full or frozen")

    run_service(registry, model=model, holdout=holdout, dataset=dataset, split=split, host=host, port=port,
                token_file=token_file,
                worker=WorkerSettings(tolerance=tolerance, new_class_examples=new_class_examples,
                                      rollback_window=rollback_window, rollback_margin=rollback_margin,
                                      crop=list(crop) if crop else None, finetune=update_finetune,
                                      steps=update_steps, replay=update_replay, nice=update_nice,
                                      threads=update_threads, device=device),
                settings={"device": device, "predict_workers": predict_workers, "max_queued": max_queued,
                          "max_upload_bytes": int(max_upload_mb * 2**20), "max_pixels": int(max_megapixels * 1e6)})


@data_app.command("check")
def data_check(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="Dataset root")],
    dataset: DatasetOpt = None,
) -> None:
    """Validate every image/mask pair and print class pixel frequencies; exit 1 on problems."""
    from everseg.data import check_dataset
    from everseg.data.check import print_report

    ctx.find_root().error_code = 1  # a check that finds problems exits 1
    report = check_dataset(path, dataset=dataset)
    print_report(report, Console(soft_wrap=True, emoji=False))
    if not report.ok:
        raise typer.Exit(1)


@data_app.command("fetch")
def data_fetch(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Dataset to download (camvid)")],
    dest: Annotated[Path, typer.Option(help="Where to put it")] = Path("data"),
) -> None:
    """Download a public dataset (needs internet) and verify it."""
    from everseg.data import fetch_dataset

    ctx.find_root().error_code = 1
    try:
        where = fetch_dataset(name, dest)
    except Exception as exc:  # network errors come in many types; all end the same way for the user
        _fail(_message(exc), code=1)
    console.print(f"{name} is in {where}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
