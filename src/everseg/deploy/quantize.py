"""Static int8 quantisation of an exported model in ONNX Runtime, calibrated on the user's images.

QDQ format (QuantizeLinear/DequantizeLinear pairs around the quantised operators, which ONNX
Runtime fuses into integer kernels), weights per output channel, activation ranges from
calibration images. What stays in float, and why:

- ``Resize``: ONNX Runtime drops the Q/DQ pair around a quantised Resize and its output changes
  (the upsampled decoder features and the logits lose their smooth interpolation);
- the classifier (the last convolution): its logits decide every pixel's class, and a
  per-tensor activation scale over all classes costs accuracy for no measurable time;
- everything but convolutions (the input normalisation, padding, pooling, concatenation):
  cheap in float, and every extra Q/DQ pair is another rounding.

``torch.ao.quantization`` is deprecated in current PyTorch, hence ONNX Runtime's tool.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np


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


def quantize_int8(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, images: Sequence[np.ndarray],
                  reduce_range: bool = False) -> list[str]:
    """Quantise the ONNX file ``src`` into ``dst`` (may be the same path), calibrated on ``images``
    (RGB uint8 at a size the file takes); return what was kept in float and why.

    ``reduce_range`` quantises weights to 7 bits: on AVX2 CPUs without VNNI the u8 x s8 kernels
    add pairs of products in 16 bits, which can saturate with full-range weights.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not images:
        raise ValueError("int8 quantisation needs calibration images")
    src, dst = Path(src), Path(dst)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference and graph optimisation first (ONNX Runtime's advice): the quantiser
        # then sees the fused Conv+ReLU patterns it quantises as one.
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        keep, said = _float_nodes(prepared)
        out = Path(tmp) / "int8.onnx"
        quantize_static(str(prepared), str(out), _Calibration(images, "image"), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, op_types_to_quantize=["Conv"], nodes_to_exclude=keep,
                        calibrate_method=CalibrationMethod.MinMax)
        os.replace(out, dst)
    return said
