"""Static int8 quantisation of an exported model in ONNX Runtime, calibrated on the user's images.

QDQ format (QuantizeLinear/DequantizeLinear pairs around the quantised operators, which ONNX
Runtime fuses into integer kernels), weights per output channel, activation ranges from
calibration images. What stays in float, and why:

- ``Resize``: ONNX Runtime drops the Q/DQ pair around a quantised Resize and its output changes
  (the upsampled decoder features and the logits lose their smooth interpolation);
- the classifier (the last convolution): its logits decide every pixel's class, and a
  per-tensor activation scale over all classes costs accuracy for no measurable time;
- everything but convolutions (the input normalisation, padding, pooling, concatenation):
  cheap in float, and every extra Q/DQ pair is another rounding;
- with ``min_agreement``, the convolutions whose rounding moves the classes most. Which ones
  is measured, not guessed: on a CamVid DeepLabV3+/MobileNetV2 every convolution in int8
  kept the float model's class on 93.2 % of the pixels, the decoder alone in int8 on 99.3 %,
  the backbone's 1x1 convolutions alone 93.5 % (activation noise grows through the 17
  inverted-residual blocks). Each convolution is quantised alone and scored by how far its
  rounding moves the logits on a few calibration images; then the least harmful ones are
  quantised together, as many as keep the classes of those images within the threshold
  (a binary search over how many). Calibration runs once; each trial reuses its ranges.

``torch.ao.quantization`` is deprecated in current PyTorch, hence ONNX Runtime's tool.
"""

from __future__ import annotations

import inspect
import logging
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)


def _float_nodes(model_path: Path) -> tuple[list[str], list[str]]:
    """Node names to keep in float, and a line for the user about each group."""
    import onnx

    graph = onnx.load(str(model_path)).graph
    resizes = [n.name for n in graph.node if n.op_type == "Resize"]
    convs = [n for n in graph.node if n.op_type == "Conv"]
    keep = list(resizes)
    said = []
    if resizes:
        said.append(f"{len(resizes)} Resize: ONNX Runtime strips the Q/DQ pair around a quantised Resize "
                    "and its output changes")
    if convs:
        keep.append(convs[-1].name)
        said.append(f"the classifier ({convs[-1].name}): its logits pick every pixel's class")
    said.append("every operator but Conv (normalisation, padding, pooling, concatenation): cheap in float, "
                "and each Q/DQ pair is one more rounding")
    return keep, said


class _Calibration:
    """ONNX Runtime's calibration reader over RGB uint8 images."""

    def __init__(self, images: Sequence[np.ndarray], input_name: str):
        self.images, self.input_name = list(images), input_name
        self._it: Iterator[np.ndarray] | None = None

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = iter(self.images)
        image = next(self._it, None)
        if image is None:
            return None
        x = np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32) / 255.0
        return {self.input_name: x}

    def rewind(self) -> None:
        self._it = None

    def __iter__(self):
        self.rewind()
        return iter(self.get_next, None)


def _inputs(image: np.ndarray) -> dict[str, np.ndarray]:
    return {"image": np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32) / 255.0}


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _agreement(path: Path, probe: Sequence[np.ndarray], classes: Sequence[np.ndarray]) -> float:
    """Share of the ``probe`` images' pixels whose class under the file at ``path`` is ``classes``'."""
    s = _session(path)
    same = sum(int((s.run(None, _inputs(im))[0].argmax(1) == c).sum()) for im, c in zip(probe, classes))
    return same / sum(c.size for c in classes)


def _where(names: Sequence[str]) -> str:
    """``/decoder/aspp/branches.1/...`` names summarised by their module, e.g. ``decoder.aspp (3)``."""
    parts = Counter(".".join(p for p in n.strip("/").split("/")[:2]) for n in names)
    return ", ".join(f"{k} ({v})" for k, v in parts.items())


class _Trials:
    """Quantises ``prepared`` with different sets of convolutions, reusing one calibration."""

    def __init__(self, prepared: Path, images: Sequence[np.ndarray], reduce_range: bool, tmp: Path):
        self.prepared, self.images, self.reduce_range, self.tmp = prepared, images, reduce_range, tmp
        self.cache = tmp / "ranges.json"
        self.can_reuse = "calibration_cache_path" in inspect.signature(_quantize_static()).parameters

    def quantize(self, out: Path, *, exclude: Sequence[str], only: Sequence[str] | None = None) -> Path:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

        extra = {"calibration_cache_path": str(self.cache)} if self.can_reuse else {}
        _quantize_static()(str(self.prepared), str(out), _Calibration(self.images, "image"),
                           quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=self.reduce_range,
                           activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                           op_types_to_quantize=["Conv"], nodes_to_exclude=list(exclude),
                           nodes_to_quantize=list(only) if only is not None else None,
                           calibrate_method=CalibrationMethod.MinMax, **extra)
        return out


def _quantize_static():
    from onnxruntime.quantization import quantize_static

    return quantize_static


def _search(trials: _Trials, convs: list[str], keep: list[str], probe: Sequence[np.ndarray],
            target: float) -> tuple[list[str], float]:
    """The convolutions to keep in float so that the int8 file's classes agree with float's on at
    least ``target`` of the ``probe`` images' pixels; returns them and the agreement reached."""
    reference = _session(trials.prepared)
    ref_logits = [reference.run(None, _inputs(im))[0] for im in probe]
    ref_classes = [r.argmax(1) for r in ref_logits]
    scale = float(np.mean([r.var() for r in ref_logits])) or 1.0

    candidates = [c for c in convs if c not in keep]
    harm = {}
    for conv in candidates:  # each convolution in int8 alone: how far it moves the logits
        s = _session(trials.quantize(trials.tmp / "one.onnx", exclude=keep, only=[conv]))
        harm[conv] = float(np.mean([((s.run(None, _inputs(im))[0] - r) ** 2).mean()
                                    for im, r in zip(probe[:2], ref_logits)])) / scale
    order = sorted(candidates, key=harm.__getitem__)
    lo, hi, best = 0, len(order), 1.0  # lo convolutions in int8 are known to keep the target
    while lo < hi:
        mid = (lo + hi + 1) // 2
        reached = _agreement(trials.quantize(trials.tmp / "some.onnx", exclude=keep + order[mid:]), probe, ref_classes)
        if reached >= target:
            lo, best = mid, reached
        else:
            hi = mid - 1
    return order[lo:], best


def quantize_int8(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, images: Sequence[np.ndarray],
                  reduce_range: bool = False, min_agreement: float | None = None) -> list[str]:
    """Quantise the ONNX file ``src`` into ``dst`` (may be the same path), calibrated on ``images``
    (RGB uint8 at a size the file takes); return what was kept in float and why.

    ``min_agreement``: when every convolution in int8 changes the class of more than this share
    of the pixels of (up to 4 of) the calibration images, the convolutions that cost the most
    stay in float (see the module docstring). The search aims a little higher (half-way to
    100 %), so that other images, such as the export's parity check, meet the threshold too.

    ``reduce_range`` quantises weights to 7 bits: on AVX2 CPUs without VNNI the u8 x s8 kernels
    add pairs of products in 16 bits, which can saturate with full-range weights.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not images:
        raise ValueError("int8 quantisation needs calibration images")
    src, dst = Path(src), Path(dst)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp_name:
        tmp = Path(tmp_name)
        prepared = tmp / "prepared.onnx"
        # Shape inference and graph optimisation first (ONNX Runtime's advice): the quantiser
        # then sees the fused Conv+ReLU patterns it quantises as one.
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        keep, said = _float_nodes(prepared)
        trials = _Trials(prepared, images, reduce_range, tmp)
        out = trials.quantize(tmp / "int8.onnx", exclude=keep)
        if min_agreement is not None:
            import onnx

            spread = np.linspace(0, len(images) - 1, min(4, len(images))).round().astype(int).tolist()
            probe = [images[i] for i in dict.fromkeys(spread)]
            target = min(1.0, min_agreement + (1.0 - min_agreement) / 2)
            classes = [r.argmax(1) for r in (_session(prepared).run(None, _inputs(im))[0] for im in probe)]
            everything = _agreement(out, probe, classes)
            if everything < target:
                if not trials.can_reuse:
                    said.append(f"no search for convolutions to keep in float: this onnxruntime cannot reuse a "
                                f"calibration (every convolution in int8 agrees with float on {100 * everything:.1f} %)")
                else:
                    convs = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type == "Conv"]
                    log.info("int8: every convolution in int8 keeps the float classes of %.1f %% of the pixels of "
                             "%d calibration images, below %.2f %%; measuring each convolution's cost "
                             "(about a second each, %d of them)", 100 * everything, len(probe), 100 * target,
                             len(convs))
                    extra, reached = _search(trials, convs, keep, probe, target)
                    if len(extra) == sum(c not in keep for c in convs):
                        raise ValueError(f"not written: any convolution in int8 moves the classes of more than "
                                         f"{100 * (1 - target):.2g} % of the calibration images' pixels (all of them "
                                         f"in int8: {100 * (1 - everything):.1f} %); lower --min-agreement")
                    out = trials.quantize(tmp / "int8.onnx", exclude=keep + extra)
                    quantised = len(convs) - sum(c in keep for c in convs) - len(extra)
                    said.append(
                        f"{len(extra)} of {len(convs)} convolutions ({_where(extra)}): in int8 they moved the "
                        f"classes most; without them {quantised} convolutions in int8 keep "
                        f"{100 * reached:.2f} % of {len(probe)} calibration images' pixels (all of them in int8: "
                        f"{100 * everything:.2f} %; aimed at {100 * target:.2f} %)")
        os.replace(out, dst)
    return said
