"""The jobs the command line runs, as plain functions: evaluate, predict, teach, run a scenario, the demo.

The CLI only parses arguments and calls these, so everything it does can be done from Python.
Messages for the user go to the ``everseg`` logger (the CLI prints them on stderr).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from everseg.atomic import atomic_write
from everseg.data.dataset import SegmentationDataset
from everseg.data.errors import DataError
from everseg.data.io import read_image

log = logging.getLogger(__name__)


def resolve_model_dir(path: str | Path) -> Path:
    """Accept a model folder (``config.json`` inside) or a training run folder holding ``model/``."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / "model" / "config.json").is_file():
        return path / "model"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model folder")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: is a file, not a model folder (config.json + model.safetensors)")
    raise FileNotFoundError(f"{path}: not an everseg model folder (no config.json, nor model/config.json)")


def load_trained_model(path: str | Path, device: str = "cpu") -> torch.nn.Module:
    """A model folder, a run folder holding ``model/``, or an ONNX file written by ``everseg export``
    (run by ONNX Runtime behind the same interface, on the CPU).

    ``device``: where the model runs (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``; see
    :mod:`everseg.devices`)."""
    from everseg.devices import check_device_name, resolve_device
    from everseg.models import load_model

    if Path(path).suffix.lower() == ".onnx":
        from everseg.deploy import load_onnx_model

        if check_device_name(device, "--device") not in ("auto", "cpu"):
            raise ValueError(f"--device {device}: {path} is an ONNX file, which everseg runs on the CPU "
                             "(ONNX Runtime's CPU provider); give the model folder to run it on a GPU")
        return load_onnx_model(path, threads=torch.get_num_threads())
    target = resolve_device(device, option="--device")
    return load_model(resolve_model_dir(path), map_location=target)


def export_model(model: str | Path, out: str | Path, *, height: int | None = None, width: int | None = None,
                 dynamic: bool = False, int8: bool = False, calibration: str | Path | None = None,
                 dataset: str | None = None, split: str = "train", calibration_images: int = 32,
                 check_images: int = 4, min_agreement: float | None = None, overwrite: bool = False) -> Any:
    """``everseg export``: the model as an ONNX file (optionally int8), checked against PyTorch.

    With ``int8`` the activation ranges come from ``calibration_images`` images spread over
    ``calibration`` (the user's own training images); their classes must be the model's. The
    parity check uses other images of the same data (the embedded sample's without it), and
    refuses a file whose classes agree with PyTorch's on less than ``min_agreement`` of the
    pixels (default 99.5 %, 99 % for int8: convolutions whose rounding moves the classes stay in float).
    """
    from everseg.deploy import export_onnx

    if int8 and calibration is None:
        raise ValueError("--int8 needs --calibration DATA: the user's own images set the activation ranges")
    if not int8 and calibration is not None:
        raise ValueError("--calibration is for --int8 (a float export needs no calibration)")
    if calibration_images < 1 or check_images < 1:
        raise ValueError("--calibration-images and --check-images must be at least 1")
    path = Path(out)
    if path.exists() and not overwrite:  # before the model is read: a refused export does nothing
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    net = load_trained_model(model)
    if not hasattr(net, "config"):
        raise ValueError(f"{model}: only everseg model folders can be exported (this is already ONNX)")
    checks = None
    int8_options = None
    if calibration is not None:
        from everseg.data import open_dataset

        data = open_dataset(calibration, dataset=dataset, split=split)
        names, model_names = list(data.label_space.names), list(net.label_space.names)
        if names != model_names[:len(names)] or not names:
            raise DataError(None, f"--calibration {calibration}: its classes {names} are not the model's "
                                  f"{model_names}; calibrate on data of the same classes")
        if len(data) < 2:
            raise DataError(None, f"--calibration {calibration}: needs at least 2 images (calibration and a check)")
        order = np.linspace(0, len(data) - 1, min(len(data), calibration_images + check_images)).round().astype(int)
        order = list(dict.fromkeys(order.tolist()))
        # Every k-th spread image checks parity; the rest calibrate: the check is on images the
        # ranges were not fitted to.
        k = max(2, len(order) // check_images)
        check_ids = order[k - 1::k][:check_images]
        cal_ids = [i for i in order if i not in check_ids][:calibration_images]
        from everseg.deploy.onnx import check_images_for

        size = (height, width) if height is not None and width is not None else None
        int8_options = {"images": check_images_for(size, [data.decoded(i)[0] for i in cal_ids], count=len(cal_ids)),
                        "description": f"{len(cal_ids)} images of {calibration} ({split})"}
        checks = [data.decoded(i)[0] for i in check_ids]
    if min_agreement is None:
        min_agreement = 0.99 if int8 else 0.995
    return export_onnx(net, path, height=height, width=width, dynamic=dynamic, check_images=checks,
                       min_agreement=min_agreement, overwrite=overwrite, int8=int8_options,
                       source=str(Path(model).resolve()))


def set_threads(threads: int | None) -> None:
    """Torch's intra-op threads for inference (None: torch's default, one per core). On a busy
    machine fewer threads than cores is faster: eval ran at 1.1 img/s with 2 threads beside
    another job on 2 cores, 19.9 with one."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)


def _bf16(bf16: bool | None, model: torch.nn.Module | None = None) -> bool:
    """bfloat16 autocast for inference: as given, else where the model's device computes it natively."""
    from everseg.devices import choose_precision
    from everseg.evaluate.inference import _model_device

    if bf16 is not None:
        return bf16
    device = _model_device(model) if model is not None else torch.device("cpu")
    return choose_precision(device).dtype == torch.bfloat16


def evaluate_model(model: torch.nn.Module, dataset: SegmentationDataset, *, out_dir: str | Path | None = None,
                   json_path: str | Path | None = None, overlays: int = 0, mode: str = "whole",
                   crop_size: tuple[int, int] | None = None, flip: bool = False,
                   scales: Sequence[float] = (1.0,), bf16: bool | None = None, progress: bool = True,
                   console: Any = None) -> Any:
    """Evaluate, print the table, write JSON, plots and ``overlays`` comparison images."""
    from everseg.evaluate import (evaluate, plot_confusion_matrix, plot_per_class_iou,
                                  print_metrics_table, save_comparison, write_metrics_json)

    if overlays < 0:
        raise ValueError(f"--overlays must be 0 or more, got {overlays}")
    from everseg.data.scenarios import align_to_model

    bf16 = _bf16(bf16, model)
    dataset, scored = align_to_model(dataset, model.label_space)
    out = Path(out_dir) if out_dir is not None else None
    saved: list[Path] = []

    def save_overlays(items: list[dict[str, Any]], preds: torch.Tensor) -> None:
        for item, pred in zip(items, preds):
            if out is None or len(saved) >= overlays:
                return
            path = out / "overlays" / f"{item['stem']}.png"
            save_comparison(path, item["image"].permute(1, 2, 0).numpy(), item["mask"].numpy(),
                            pred.cpu().numpy(), model.label_space)
            saved.append(path)

    result = evaluate(model, dataset, mode=mode, crop_size=crop_size, flip=flip, scales=scales,
                      autocast_bf16=bf16, channels_last=True, progress=progress, score_classes=scored,
                      on_batch=save_overlays if overlays and out is not None else None)
    ls = result.label_space or model.label_space
    print_metrics_table(result.metrics, ls, console=console)
    extra = {"dataset": dataset.name, "num_images": result.num_images,
             "images_per_second": result.images_per_second, "settings": result.settings}
    if json_path is not None:
        write_metrics_json(json_path, result.metrics, ls, extra=extra)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_metrics_json(out / "metrics.json", result.metrics, ls, extra=extra)
        plot_per_class_iou(out / "per_class_iou.png", result.metrics, ls)
        plot_confusion_matrix(out / "confusion_matrix.png", result.confusion.matrix, ls, normalize=True)
    result.overlay_paths = saved
    return result


def save_index_png(path: str | Path, mask: np.ndarray, palette: Sequence[tuple[int, int, int]]) -> Path:
    """A palette PNG: pixel values are class ids, viewers show the class colours."""
    img = Image.fromarray(mask.astype(np.uint8), mode="P")
    flat = [c for rgb in palette for c in rgb]
    img.putpalette(flat + [0, 0, 0] * (256 - len(palette)))
    return atomic_write(path, lambda p: img.save(p, format="PNG"))


IMAGE_FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def image_files(inputs: Sequence[str | Path]) -> list[Path]:
    """The image files named by ``inputs``: files as given, folders as their images (sorted).

    A missing path is an error naming it; so is a folder without images.
    """
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_FILE_SUFFIXES)
            if not found:
                raise DataError(p, f"folder holds no images ({', '.join(IMAGE_FILE_SUFFIXES)})")
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            raise DataError(p, "no such file or folder")
    if not files:
        raise ValueError("no images given")
    return files


@dataclass
class PredictReport:
    written: list[tuple[Path, Path]] = field(default_factory=list)  # (mask, overlay) per image done
    failed: list[tuple[Path, str]] = field(default_factory=list)  # (image, problem) per image that failed


def predict_files(model: torch.nn.Module, images: Sequence[str | Path], out_dir: str | Path, *,
                  mode: str = "whole", crop_size: tuple[int, int] | None = None, flip: bool = False,
                  scales: Sequence[float] = (1.0,), bf16: bool | None = None, overwrite: bool = False,
                  legend: bool = True, on_image: Callable[[int, int, Path], None] | None = None,
                  on_tile: Callable[[int, int], None] | None = None) -> PredictReport:
    """Write ``<stem>_mask.png`` (class ids, palette PNG) and ``<stem>_overlay.png`` per image.

    Images (files, or folders of them) that cannot be read are reported in the result and
    the others still predicted. Existing output files are refused before anything is
    written unless ``overwrite``; two inputs with the same stem are refused too (their
    outputs would collide). Large images are predicted in tiles within a fixed memory bound
    (:func:`everseg.evaluate.tiled.predict_image`); ``on_image(i, n, path)`` and
    ``on_tile(done, total)`` report progress.
    """
    from everseg.evaluate import overlay, predict_image, with_legend
    from everseg.evaluate.inference import _check_options

    _check_options(mode, crop_size, None, scales)
    bf16 = _bf16(bf16, model)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; predictions go into a folder")
    files = image_files(images)
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems:
            raise ValueError(f"{f} and {stems[f.stem]} have the same name {f.stem!r}: their predictions would "
                             "overwrite each other; predict them into separate folders")
        stems[f.stem] = f
    targets = {f: (out / f"{f.stem}_mask.png", out / f"{f.stem}_overlay.png") for f in files}
    existing = [t for pair in targets.values() for t in pair if t.exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise FileExistsError(f"{existing[0]}{more} already exist: pass --overwrite to replace them, "
                              "or choose another --out")
    report = PredictReport()
    for i, path in enumerate(files):
        if on_image is not None:
            on_image(i, len(files), path)
        try:
            rgb = read_image(path)
        except (DataError, OSError, ValueError) as exc:
            report.failed.append((path, str(exc)))
            continue
        pred, _ = predict_image(model, rgb, on_tile=on_tile, mode=mode, crop_size=crop_size, flip=flip,
                                scales=scales, autocast_bf16=bf16, channels_last=True)
        mask_path, overlay_path = targets[path]
        out.mkdir(parents=True, exist_ok=True)
        save_index_png(mask_path, pred, model.label_space.palette)
        blend = overlay(rgb, pred, model.label_space)
        if legend:
            blend = with_legend(blend, pred, model.label_space)
        atomic_write(overlay_path, lambda p: Image.fromarray(blend).save(p, format="PNG"))
        report.written.append((mask_path, overlay_path))
    return report


# ---------------------------------------------------------------------------- incremental learning
def parse_class_names(text: str, option: str = "--new-classes") -> list[str]:
    """``"Bollard, Scooter"`` -> ``["Bollard", "Scooter"]``; empty or repeated names are errors."""
    names = [c.strip() for c in text.split(",")]
    if not any(names):
        raise ValueError(f"{option} {text!r} names no class (an empty shell variable?); give names "
                         f"such as {option} Bollard,Scooter, or leave the option out to learn new data "
                         "of the known classes")
    if not all(names):
        raise ValueError(f"{option} {text!r} has an empty name between commas")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{option} {text!r} names {repeated} more than once")
    return names


@dataclass(frozen=True)
class DataSource:
    """Where a dataset split is: what ``open_dataset`` needs."""

    path: str
    dataset: str | None = None
    split: str = "train"

    def open(self) -> SegmentationDataset:
        from everseg.data import open_dataset

        return open_dataset(self.path, dataset=self.dataset, split=self.split)


def recorded_training_data(model: torch.nn.Module) -> DataSource | None:
    """The data a model was trained on, as its metadata records it (models saved by ``train``)."""
    src = (getattr(model, "metadata", None) or {}).get("train_data_source")
    if not isinstance(src, Mapping) or not src.get("path") or not Path(src["path"]).exists():
        return None
    return DataSource(str(src["path"]), src.get("dataset"), src.get("split") or "train")


def starting_memory(model_dir: Path, model: torch.nn.Module, *, budget: int, seed: int = 0,
                    base_data: DataSource | None = None) -> Any:
    """The replay memory a step from ``model`` starts with, when replay cannot find it itself.

    None when the model has a stored memory and ``base_data`` is not given: replay loads the
    stored one (:class:`~everseg.learn.strategies.Replay`). Else one filled from the data the
    model learned from (``base_data``, or what its metadata records); else an empty one, with
    a warning: replay can then only rehearse the new images, not what the model knew.
    """
    from everseg.data.scenarios import align_labels
    from everseg.learn.memory import ReplayMemory

    if base_data is None and (model_dir / "memory" / "memory.json").is_file():
        log.info("replay: rehearsing the images stored with %s", model_dir)
        return None
    memory = ReplayMemory(budget, policy="class_balanced", seed=seed)
    source = base_data or recorded_training_data(model)
    if source is None:
        log.warning("replay: %s has no stored replay memory and does not record the data it was trained "
                    "on, so there is nothing old to rehearse: the first step replays only the new images. "
                    "Pass --base-data (the data it learned from) to rehearse what it knows.", model_dir)
        return memory
    data = align_labels(source.open(), model.label_space)
    memory.update(data, step=0)
    log.info("replay: memory filled with %d of the %d images of %s, the data %s learned from",
             len(memory), len(data), data.name, model_dir)
    return memory


def teach(model: str | Path, data: str | Path, out: str | Path, *, new_classes: Sequence[str] | None = None,
          strategy: str | None = None, dataset: str | None = None, split: str = "train", test_split: str = "test",
          config: Any = None, epochs: int | None = None, minutes: float | None = None, memory_size: int = 20,
          params: Mapping[str, Any] | None = None, base_data: DataSource | None = None,
          overwrite: bool = False, resume: bool = False, progress: bool = True) -> Any:
    """Teach an existing model new classes (``new_classes``) or new data of its classes.

    ``epochs`` and ``minutes`` budget the step; with neither, it gets a tenth of the time the
    model took to learn (:func:`~everseg.learn.continual.default_step_minutes`).

    ``config``: a RunConfig for augmentation and optimiser (its model section is the
    model's own). The new model is ``out/model``; it records its parent. Returns the
    :class:`~everseg.evaluate.ContinualReport`.
    """
    from everseg.data import open_dataset
    from everseg.data.scenarios import align_labels, build_scenario
    from everseg.learn import load_config
    from everseg.learn.continual import class_incremental_spec, domain_spec, run_scenario
    from everseg.learn.run import fit_to_data
    from everseg.learn.rundir import claim_run_folder
    from everseg.learn.strategies import build_strategies, default_strategy, with_memory_size

    model_dir = resolve_model_dir(model).resolve()
    if not resume:  # run_scenario checks a resumed folder
        claim_run_folder(out, overwrite=overwrite, protect=[model_dir])
    base = load_trained_model(model_dir)
    cfg = config if config is not None else load_config(None, {"data.val_split": None})
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={
        "arch": base.config.arch, "backbone": base.config.backbone, "output_stride": base.config.output_stride})})
    strategy = strategy or default_strategy(bool(new_classes))
    strategies = build_strategies(strategy, with_memory_size(strategy, params, memory_size))
    pool = open_dataset(data, dataset=dataset, split=split)
    test = open_dataset(data, dataset=dataset, split=test_split)
    cfg = fit_to_data(cfg, pool)[0]  # the fields left unset follow the new data, as in train
    if new_classes:
        spec = class_incremental_spec(base.label_space.names, list(new_classes))
    else:  # same classes, new data: speak the model's class ids
        spec = domain_spec()
        pool, test = align_labels(pool, base.label_space), align_labels(test, base.label_space)
    scenario = build_scenario(spec, pool, test, base_trained=True)
    for s in strategies:
        if s.uses_memory:
            s.memory = starting_memory(model_dir, base, budget=s.memory_size, seed=cfg.train.seed, base_data=base_data)
    return run_scenario(scenario, strategies, cfg, out, base_model=model_dir,
                        step_epochs=epochs, step_minutes=minutes, progress=progress, overwrite=overwrite,
                        resume=resume, name=strategy)


def run_named_scenario(data: str | Path, out: str | Path, *, protocol: str | None = None,
                       scenario: str | Path | None = None, strategy: str | None = None,
                       dataset: str | None = None, config: Any = None, step_epochs: int | None = None,
                       step_minutes: float | None = None, base_model: str | Path | None = None,
                       memory_size: int = 20, params: Mapping[str, Any] | None = None,
                       overwrite: bool = False, resume: bool = False, progress: bool = True) -> Any:
    """Run a built-in ``protocol`` or a ``scenario`` YAML file on ``data`` with ``strategy``
    (``resume``: go on with the interrupted run in ``out``)."""
    from everseg.data import open_dataset
    from everseg.data.protocols import get_protocol
    from everseg.data.scenarios import ScenarioSpec, build_scenario
    from everseg.learn import load_config
    from everseg.learn.continual import run_scenario
    from everseg.learn.run import fit_to_data
    from everseg.learn.rundir import claim_run_folder
    from everseg.learn.strategies import build_strategies, default_strategy, with_memory_size

    if (protocol is None) == (scenario is None):
        raise ValueError("give exactly one of --protocol and --scenario")
    base_dir = resolve_model_dir(base_model).resolve() if base_model is not None else None
    if not resume:  # run_scenario checks a resumed folder
        claim_run_folder(out, overwrite=overwrite, protect=[base_dir] if base_dir else ())
    spec = get_protocol(protocol) if protocol else ScenarioSpec.from_yaml(scenario)
    # A misspelt strategy or hyper-parameter is refused before the dataset is read and fitted,
    # which takes minutes on a large folder.
    strategy = strategy or default_strategy(spec.kind == "class")
    strategies = build_strategies(strategy, with_memory_size(strategy, params, memory_size))
    kind = dataset or spec.dataset
    pool = open_dataset(data, dataset=kind, split=spec.train_split)
    test = open_dataset(data, dataset=kind, split=spec.test_split)
    sc = build_scenario(spec, pool, test, base_dir=Path(scenario).parent if scenario else None,
                        base_trained=base_dir is not None)
    # The fields left unset follow the training pool, as in train, for every step.
    cfg = fit_to_data(config if config is not None else load_config(None, {"data.val_split": None}), pool)[0]
    return run_scenario(sc, strategies, cfg, out, step_epochs=step_epochs, step_minutes=step_minutes,
                        base_model=base_dir, progress=progress, overwrite=overwrite, resume=resume,
                        name=strategy)


# ---------------------------------------------------------------------------- the demo
def run_demo(out: str | Path, *, epochs: int | None = None, overwrite: bool = False, console: Any = None) -> Any:
    """Fine-tune ImageNet MobileNetV2 on the embedded CamVid sample, evaluate it, draw overlays."""
    from everseg.data import open_dataset
    from everseg.learn import load_config, train
    from everseg.learn.rundir import claim_run_folder
    from everseg.samples import SAMPLES_DIR, camvid_mini

    out = Path(out)
    claim_run_folder(out, overwrite=overwrite)
    overrides: dict = {"data.path": str(camvid_mini())}
    if epochs is not None:
        overrides["train.epochs"] = epochs
    cfg = load_config(SAMPLES_DIR / "demo.yaml", overrides, labels={"train.epochs": f"--epochs {epochs}"})
    log.info("training %s/%s on %s for %d epochs -> %s", cfg.model.arch, cfg.model.backbone, camvid_mini(),
             cfg.train.epochs, out)
    result = train(cfg, out, overwrite=overwrite)
    test = open_dataset(camvid_mini(), dataset="folder", split="test")
    report = out / "report"
    evaluate_model(load_trained_model(result.model_dir), test, out_dir=report,
                   json_path=report / "metrics.json", overlays=20, console=console)
    return result, report
