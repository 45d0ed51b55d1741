"""Deployment speed and accuracy: one CamVid model run as eager PyTorch and through ONNX Runtime
(float32 and static int8), on the 233 CamVid test images at 360x480, batch 1, 2 threads.

    .venv/bin/python benchmarks/deploy.py --model RUN_OR_MODEL      # about 10 minutes on 2 cores
    .venv/bin/python benchmarks/deploy.py --model benchmarks/runs/deploy/camvid-teacher \
        --extra "pruned 40 % + KD=benchmarks/runs/deploy/pruned40" \
        --extra "student LR-ASPP + KD=benchmarks/runs/deploy/student-kd" \
        --extra "student LR-ASPP, no KD (eager only)=benchmarks/runs/deploy/student-plain"
                                            # the models benchmarks/compress.py trains; ~20 minutes

Each row: images per second and p50 latency (the runtimes take turns in blocks of 10 images) of the whole prediction (model + class argmax) over
the test set, MACs and parameters of the graph, file size, test mIoU, and the share of test
pixels whose class equals the (teacher's) eager float32's. The int8 files are calibrated on 32 CamVid training
images; "int8" is what `everseg export --int8` writes (convolutions that move the classes stay float, 99 %
agreement), "int8, every convolution" has no threshold. Writes results/deploy.json and its section of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from common import BENCH_DIR, SHARED_DATA, machine_info, update_readme_section, write_json

RUNS = BENCH_DIR / "runs" / "deploy"


def cpu_flags() -> dict[str, bool]:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return {name: name in flags for name in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")}


def macs_and_params(model, size=(360, 480)) -> tuple[float, int]:
    from everseg.deploy.prune import count_macs

    return count_macs(model, size), sum(p.numel() for p in model.parameters())


def run(models: list[tuple[object, bool]], test, num_classes: int, block: int = 10) -> list[dict]:
    """Predict every test image one at a time with each model: per model, timings, mIoU, and the
    share of pixels whose class equals the first model's. ``models``: (model, channels_last).

    The models take turns in blocks of ``block`` images, each block after one untimed image:
    the machine's slow and fast moments fall on every model alike, and no model is timed while
    another's idle threads still spin (ONNX Runtime's workers spin after a run: timed image by
    image in turn, eager PyTorch read 172 ms per image, where `benchmarks/serve.py` measures the
    same architecture alone at 97 ms)."""
    import torch

    from everseg.evaluate import predict
    from everseg.evaluate.metrics import SegmentationMetrics

    k = len(models)
    confusion = [np.zeros((num_classes, num_classes), dtype=np.int64) for _ in range(k)]
    seconds: list[list[float]] = [[] for _ in range(k)]
    agree = [0] * k
    total = 0
    for first in range(0, len(test), block):
        items = [test.decoded(i) for i in range(first, min(first + block, len(test)))]
        xs = [torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None] for image, _ in items]
        preds: list[list[np.ndarray]] = []
        for j, (model, channels_last) in enumerate(models):
            predict(model, xs[0], channels_last=channels_last)
            preds.append([])
            for x, (_, mask) in zip(xs, items):
                start = time.perf_counter()
                pred = predict(model, x, channels_last=channels_last)[0].numpy()
                seconds[j].append(time.perf_counter() - start)
                valid = mask != 255
                confusion[j] += np.bincount(mask[valid].astype(np.int64) * num_classes + pred[valid],
                                            minlength=num_classes ** 2).reshape(num_classes, num_classes)
                preds[j].append(pred)
        for j in range(k):
            agree[j] += sum(int((a == b).sum()) for a, b in zip(preds[0], preds[j]))
        total += sum(p.size for p in preds[0])
    return [{"images": len(seconds[j]), "img_per_s": len(seconds[j]) / sum(seconds[j]),
             "p50_ms": 1000 * float(np.median(seconds[j])),
             "miou": SegmentationMetrics.from_confusion(confusion[j]).miou,
             "agreement_with_eager_fp32": agree[j] / total} for j in range(k)]


def table(r: dict) -> str:
    m, f = r["machine"], r["cpu_flags"]
    isa = ", ".join(k for k, v in f.items() if v) or "none of the listed"
    base = r["rows"][0]
    out = ["## Deployment (`python benchmarks/deploy.py`)", "",
           f"{m['date']}, commit {m['commit']}, {m['cpu']}, {m['cores']} cores, 2 threads, torch {m['torch']}, "
           f"onnxruntime {r['onnxruntime']}. CPU instruction sets: {isa}. Model: {r['model_name']} "
           f"({r['model_note']}). {base['images']} CamVid test images at 360x480, batch 1; a prediction is the model "
           "and the class argmax.", "",
           "| runtime | img/s | p50 ms | speed vs eager fp32 | GMACs | parameters | file MB | test mIoU | "
           "pixels as the teacher's eager fp32 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        out.append(f"| {row['name']} | {row['img_per_s']:.2f} | {row['p50_ms']:.0f} | "
                   f"{row['img_per_s'] / base['img_per_s']:.2f}x | {row['macs'] / 1e9:.2f} | "
                   f"{row['params'] / 1e6:.2f} M | {row['file_mb']:.1f} | {row['miou']:.1f} | "
                   f"{100 * row['agreement_with_eager_fp32']:.2f} % |")
    for line in r.get("notes", []):
        out += ["", line]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="model folder or run folder (a CamVid-11 model)")
    p.add_argument("--model-note", default="", help="where the model came from, for the table")
    p.add_argument("--data", type=Path, default=SHARED_DATA / "camvid")
    p.add_argument("--calibration-images", type=int, default=32)
    p.add_argument("--extra", action="append", default=[], metavar="LABEL=MODEL",
                   help="another model of the same classes (a pruned model, a student); a label ending in "
                        "'(eager only)' gets no ONNX rows")
    p.add_argument("--images", type=int, default=None, help="only the first N test images (a quick check)")
    p.add_argument("--report", action="store_true", help="only write the README section from results/deploy.json")
    args = p.parse_args()
    import json

    if args.report:
        update_readme_section("deploy", table(json.loads((BENCH_DIR / "results" / "deploy.json").read_text())))
        return

    import onnxruntime
    import torch

    from everseg.data import open_dataset
    from everseg.devices import cpu_has_native_bf16
    from everseg.workflows import export_model, load_trained_model, resolve_model_dir

    torch.set_num_threads(2)
    RUNS.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model_dir(args.model)
    test = open_dataset(args.data, dataset="camvid", split="test")
    if args.images:
        test = test.subset(range(min(args.images, len(test))))
    rows, notes = [], []
    runs = []  # (row name, model, channels_last, file MB, extra, eager model for MACs, group)

    def add_model(label: str, directory: Path, tag: str, onnx_rows: bool) -> None:
        """Rows of one model: eager fp32 (channels-last, as everseg's commands run it: 1.8x NCHW's speed
        here), and with ``onnx_rows`` ONNX Runtime fp32 and int8 (calibrated on CamVid training images)."""
        eager = load_trained_model(directory).to(memory_format=torch.channels_last)
        mb = (directory / "model.safetensors").stat().st_size / 2**20
        runs.append((f"{label}: eager PyTorch fp32 (channels-last)", eager, True, mb, {}, eager, tag))
        if not onnx_rows:
            return
        fp32 = export_model(directory, RUNS / f"{tag}-fp32.onnx", dynamic=True, overwrite=True)
        runs.append((f"{label}: ONNX Runtime fp32", load_trained_model(fp32.path), False,
                     fp32.path.stat().st_size / 2**20, {}, eager, tag))
        # int8 as `everseg export --int8` makes it (convolutions that move the classes stay float,
        # 99 % agreement); for the teacher also every convolution in int8 (no threshold).
        for name, suffix, threshold in (("int8", "int8", None), ("int8, every convolution", "int8-all", 0.01)):
            if threshold is not None and tag != "model":
                continue
            int8 = export_model(directory, RUNS / f"{tag}-{suffix}.onnx", dynamic=True, int8=True,
                                calibration=args.data, dataset="camvid", split="train",
                                calibration_images=args.calibration_images, min_agreement=threshold, overwrite=True)
            runs.append((f"{label}: ONNX Runtime {name}", load_trained_model(int8.path), False,
                         int8.path.stat().st_size / 2**20, {"kept_float": int8.kept_float}, eager, tag))

    add_model("teacher", model_dir, "model", True)
    if cpu_has_native_bf16():
        class Bf16(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner, self.label_space = inner, inner.label_space

            def forward(self, x):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return self.inner(x).float()

        eager = runs[0][1]
        runs.insert(1, ("teacher: eager PyTorch bf16 autocast (channels-last)", Bf16(eager), True, runs[0][3], {},
                        eager, "model"))
    else:
        notes.append("No eager bf16 row: this CPU has no native bfloat16 (no AVX512-BF16 or AMX), where everseg's "
                     "default is float32; bf16 autocast here would be emulated.")
    for item in args.extra:
        label, eq, where = item.partition("=")
        extra_dir = resolve_model_dir(where)
        add_model(label, extra_dir, extra_dir.parent.name, onnx_rows=not label.endswith("(eager only)"))
    macs = {}
    for _, _, _, _, _, eager, tag in runs:
        if tag not in macs:
            macs[tag] = macs_and_params(eager)
    measured = run([(m, cl) for _, m, cl, *_ in runs], test, runs[0][1].num_classes)
    for (name, _, _, mb, extra, _, tag), row in zip(runs, measured):
        rows.append({"name": name, "model": tag, "macs": macs[tag][0], "params": macs[tag][1], "file_mb": mb,
                     **extra, **row})
        print(rows[-1], flush=True)

    by = {r["name"]: r for r in rows}
    eager_row = by["teacher: eager PyTorch fp32 (channels-last)"]
    fp32_row = by["teacher: ONNX Runtime fp32"]
    for kind in ("int8", "int8, every convolution"):
        int8_row = by[f"teacher: ONNX Runtime {kind}"]
        notes.append(f"Teacher {kind} against ONNX Runtime fp32: {int8_row['img_per_s'] / fp32_row['img_per_s']:.2f}x "
                     f"the speed, {fp32_row['miou'] - int8_row['miou']:.1f} mIoU lost, "
                     f"{fp32_row['file_mb'] / int8_row['file_mb']:.1f}x smaller; against eager fp32 "
                     f"{int8_row['img_per_s'] / eager_row['img_per_s']:.2f}x the speed. "
                     + ("Most of the speed is ONNX Runtime's (its fp32 graph alone), not int8's."
                        if fp32_row["img_per_s"] / eager_row["img_per_s"] > int8_row["img_per_s"] / fp32_row["img_per_s"]
                        else "Most of the speed is int8's, not ONNX Runtime's fp32 graph's."))
    for r in rows:
        for line in r.get("kept_float", []):
            if "moved the classes" in line:
                notes.append(f"{r['name'].split(':')[0]} int8 kept in float {line}")
    for r in rows:
        if r["model"] != "model" and r["name"].endswith("eager PyTorch fp32 (channels-last)"):
            label = r['name'].split(':')[0]
            ort_row = by.get(f"{label}: ONNX Runtime fp32")
            in_ort = (f" (in ONNX Runtime fp32 {ort_row['img_per_s'] / fp32_row['img_per_s']:.2f}x)"
                      if ort_row else "")
            notes.append(f"{label} against the teacher, both eager fp32: {eager_row['macs'] / r['macs']:.2f}x "
                         f"fewer MACs, {r['img_per_s'] / eager_row['img_per_s']:.2f}x the speed{in_ort}, "
                         f"{r['miou'] - eager_row['miou']:+.1f} mIoU.")
    flags = cpu_flags()
    if not (flags["avx512_vnni"] or flags["avx_vnni"]):
        notes.append("Without VNNI (this CPU), ONNX Runtime's u8 x s8 convolutions multiply-add with AVX2's "
                     "vpmaddubsw, whose 16-bit pair sums can saturate and which does about half the work per "
                     "instruction of a VNNI CPU's vpdpbusd: on an AVX-512 VNNI CPU the int8 row should be faster "
                     "than here, and its accuracy no worse.")
    result = {"machine": machine_info(), "cpu_flags": flags, "onnxruntime": onnxruntime.__version__,
              "model_name": str(args.model), "model_note": args.model_note, "rows": rows, "notes": notes}
    write_json("deploy", result)
    update_readme_section("deploy", table(result))
    print(table(result))


if __name__ == "__main__":
    main()
