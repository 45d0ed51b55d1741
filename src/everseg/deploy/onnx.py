"""Models as ONNX files that carry everything needed to use them, and a runtime that runs them.

``export_onnx`` writes a model as an ONNX graph whose input is what everseg models take (RGB,
float32 in [0, 1], N x 3 x H x W; the normalisation is inside the graph) and whose output is
the logits at the input size. The file's metadata holds the class names and colours, the
normalisation, the input layout, the model's configuration and where it came from, so that a
user of the file needs nothing else. Before the file is written, ONNX Runtime runs it beside
eager PyTorch on a few images and the file is refused if their class maps disagree.

``OnnxSegmenter`` runs such a file through ONNX Runtime behind the interface every other
everseg model has (an ``nn.Module`` taking float images, ``label_space``), so ``evaluate``,
``predict`` and the command line use it unchanged: the same metrics, the same outputs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from everseg.atomic import atomic_write
from everseg.data.labelspace import LabelSpace
from everseg.evaluate.inference import best_class

FORMAT = "everseg.onnx/1"
INPUT, OUTPUT = "image", "logits"
# Opset 17 is what ONNX Runtime's static quantisation and the legacy exporter both handle well.
OPSET = 17


class OnnxModelError(ValueError):
    """An ONNX file everseg cannot use (not a file it wrote, or a damaged one)."""


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{module} is needed for ONNX models: pip install onnx onnxruntime") from None


@dataclass
class ExportReport:
    path: Path
    agreement: float  # fraction of checked pixels where ONNX Runtime's class equals PyTorch's
    max_abs_diff: float  # largest logit difference seen in the check
    checked_images: int
    input_size: tuple[int, int] | None  # None: any size (dynamic)
    metadata: dict[str, str] = field(default_factory=dict)
    kept_float: list[str] = field(default_factory=list)  # int8 only: operators left in float, with why


def model_metadata(model: nn.Module, *, input_size: tuple[int, int] | None, extra: dict | None = None) -> dict[str, str]:
    """The metadata an exported file carries (strings, as ONNX stores them)."""
    from everseg.models.saving import _everseg_version

    config = model.config.to_dict()
    meta = {
        "everseg.format": FORMAT,
        "everseg.version": _everseg_version(),
        "everseg.label_space": json.dumps(model.label_space.to_dict()),
        "everseg.model_config": json.dumps(config),
        "everseg.normalization": json.dumps({"mean": list(config["mean"]), "std": list(config["std"]),
                                             "applied": "inside the graph: (image - mean) / std"}),
        "everseg.input": json.dumps({"name": INPUT, "layout": "NCHW", "channels": "RGB", "dtype": "float32",
                                     "range": [0.0, 1.0],
                                     "size": list(input_size) if input_size else "any (dynamic)"}),
        "everseg.output": json.dumps({"name": OUTPUT, "layout": "NCHW", "meaning": "class logits at the input size"}),
        "everseg.model_metadata": json.dumps(getattr(model, "metadata", None) or {}),
    }
    for key, value in (extra or {}).items():
        meta[f"everseg.{key}"] = value if isinstance(value, str) else json.dumps(value)
    return meta


def _write_metadata(path: Path, meta: dict[str, str]) -> None:
    onnx = _require("onnx")
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "everseg"
    proto.doc_string = (f"everseg segmentation model: {INPUT} = RGB float32 in [0, 1], N x 3 x H x W; "
                        f"{OUTPUT} = class logits N x C x H x W. Classes and settings in the metadata (everseg.*).")
    onnx.save(proto, str(path))


def _torch_export(model: nn.Module, path: Path, input_size: tuple[int, int] | None) -> None:
    import warnings

    # A dynamic export is traced at one size; the model pads every size to its stride inside
    # the graph, so the trace holds for all of them.
    h, w = input_size or (256, 320)
    dummy = torch.rand(1, 3, h, w)
    axes = {INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}
    if input_size is None:
        axes = {INPUT: {0: "batch", 2: "height", 3: "width"}, OUTPUT: {0: "batch", 2: "height", 3: "width"}}
    with warnings.catch_warnings():
        # The TorchScript exporter: the dynamo one needs onnxscript and has lost dynamic
        # heights and widths through F.interpolate.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (dummy,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)


def _session(path: str | os.PathLike[str], threads: int | None = None) -> Any:
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    threads = threads or torch.get_num_threads()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_images_for(size: tuple[int, int] | None, images: Sequence[np.ndarray] | None = None,
                     count: int = 4) -> list[np.ndarray]:
    """Images for the parity check: the given ones (or the embedded CamVid sample's), resized to
    ``size`` when the export has a fixed one."""
    from PIL import Image

    if not images:
        from everseg.data import open_dataset
        from everseg.samples import camvid_mini

        sample = open_dataset(camvid_mini(), dataset="folder", split="test")
        images = [sample.decoded(i)[0] for i in range(min(count, len(sample)))]
    out = []
    for image in list(images)[:count]:
        if size is not None and image.shape[:2] != tuple(size):
            image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))
        out.append(np.array(image, dtype=np.uint8, order="C"))  # a copy: torch wants writable arrays
    return out


def parity(model: nn.Module, session: Any, images: Sequence[np.ndarray]) -> tuple[float, float]:
    """(argmax agreement over all pixels, largest logit difference) of ``session`` against ``model``."""
    agree = total = 0
    worst = 0.0
    with torch.inference_mode():
        for image in images:
            x = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255.0)
            expected = model(x).float()
            got = torch.from_numpy(session.run([OUTPUT], {INPUT: x.numpy()})[0]).float()
            agree += int((best_class(expected)[1] == best_class(got)[1]).sum())
            total += expected.shape[-1] * expected.shape[-2]
            worst = max(worst, float((expected - got).abs().max()))
    return agree / max(total, 1), worst


def _parse_size(height: int | None, width: int | None, dynamic: bool) -> tuple[int, int] | None:
    if dynamic and (height is not None or width is not None):
        raise ValueError("give either --height and --width (a fixed input size) or --dynamic, not both")
    if (height is None) != (width is None):
        raise ValueError("--height and --width go together (a fixed input size)")
    if height is None:
        return None
    if height < 1 or width < 1:
        raise ValueError(f"--height and --width must be positive, got {height}x{width}")
    return height, width


def export_onnx(model: nn.Module, out: str | os.PathLike[str], *, height: int | None = None,
                width: int | None = None, dynamic: bool = False, check_images: Sequence[np.ndarray] | None = None,
                min_agreement: float = 0.995, overwrite: bool = False, source: str | None = None,
                int8: dict | None = None) -> ExportReport:
    """Write ``model`` to ``out`` as ONNX (see the module docstring); return the parity report.

    Without ``height``/``width`` the file takes any image size (``dynamic``). The parity check
    runs ONNX Runtime and PyTorch on ``check_images`` (default: the embedded sample's test
    images) and refuses to write a file whose class maps agree on less than ``min_agreement``
    of the pixels. ``int8`` (``{"images": calibration images, "description": what they are}``, see
    :func:`everseg.deploy.quantize.quantize_int8`) writes a statically quantised file
    instead. An existing ``out`` is replaced only with ``overwrite``.
    """
    out = Path(out)
    size = _parse_size(height, width, dynamic)
    if out.suffix.lower() != ".onnx":
        raise ValueError(f"--out {out}: an ONNX file's name ends in .onnx")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; give a file name ending in .onnx")
    if not 0.0 < min_agreement <= 1.0:
        raise ValueError(f"the agreement threshold must be in (0, 1], got {min_agreement}")
    _require("onnx"), _require("onnxruntime")
    model = model.eval()
    images = check_images_for(size, check_images)
    report = ExportReport(out, 0.0, 0.0, len(images), size)
    extra = {"source": source} if source else {}

    def write(tmp: Path) -> None:
        _torch_export(model, tmp, size)
        if int8 is not None:
            from everseg.deploy.quantize import quantize_int8

            report.kept_float = quantize_int8(tmp, tmp, images=int8["images"], min_agreement=min_agreement)
            extra["int8"] = {"calibration": int8.get("description", ""), "kept_float": report.kept_float}
        report.metadata = model_metadata(model, input_size=size, extra=extra)
        _write_metadata(tmp, report.metadata)
        report.agreement, report.max_abs_diff = parity(model, _session(tmp), images)
        if report.agreement < min_agreement:
            raise ValueError(f"not written: ONNX Runtime's classes agree with PyTorch's on only "
                             f"{100 * report.agreement:.2f} % of the pixels of {len(images)} check images "
                             f"(needed {100 * min_agreement:g} %; largest logit difference {report.max_abs_diff:.3g})")

    created = not out.parent.exists()
    try:
        atomic_write(out, write)
    except BaseException:
        if created:
            try:
                out.parent.rmdir()  # a refused export leaves nothing behind, not even the folder
            except OSError:
                pass
        raise
    return report


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The everseg metadata of an ONNX file; a clear error for files everseg did not write."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file")
    onnx = _require("onnx")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for files that are not ONNX
        raise OnnxModelError(f"{path} is not a readable ONNX file ({type(exc).__name__})") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get("everseg.format") != FORMAT:
        raise OnnxModelError(f"{path} has no everseg metadata (classes, normalisation): export it with "
                             "everseg export, which writes them")
    return meta


class OnnxSegmenter(nn.Module):
    """An exported model run by ONNX Runtime, used like any everseg model (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None):
        super().__init__()
        self.path = Path(path)
        self.onnx_metadata = read_metadata(self.path)
        try:
            self.label_space = LabelSpace.from_dict(json.loads(self.onnx_metadata["everseg.label_space"]))
            from everseg.models.segmenter import ModelConfig

            self.config = ModelConfig.from_dict(json.loads(self.onnx_metadata["everseg.model_config"]))
            layout = json.loads(self.onnx_metadata["everseg.input"])
        except (KeyError, TypeError, ValueError) as exc:
            raise OnnxModelError(f"{self.path}: damaged everseg metadata ({exc})") from None
        self.input_size = tuple(layout["size"]) if isinstance(layout.get("size"), list) else None
        self.metadata = json.loads(self.onnx_metadata.get("everseg.model_metadata", "{}"))
        self.int8 = "everseg.int8" in self.onnx_metadata
        self._session = _session(self.path, threads)

    @property
    def num_classes(self) -> int:
        return self.label_space.num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape N x 3 x H x W, got {tuple(x.shape)}")
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            h, w = self.input_size
            raise ValueError(f"{self.path.name} was exported for {h}x{w} images, got {x.shape[-2]}x{x.shape[-1]}: "
                             f"export with --dynamic, or predict in tiles of that size (--mode slide --crop {h}x{w})")
        array = x.detach().float().contiguous().cpu().numpy()
        return torch.from_numpy(self._session.run([OUTPUT], {INPUT: array})[0])

    def extra_repr(self) -> str:
        return f"{self.path}, {self.num_classes} classes{', int8' if self.int8 else ''}"


def load_onnx_model(path: str | os.PathLike[str], threads: int | None = None) -> OnnxSegmenter:
    return OnnxSegmenter(path, threads)
