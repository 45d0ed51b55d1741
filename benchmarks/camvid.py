"""CamVid-11: train the recipe in configs/camvid.yaml, evaluate on the 233 test images at 360x480.

    python benchmarks/camvid.py                       # the ImageNet-pretrained recipe
    python benchmarks/camvid.py --variant random      # same recipe, random initialisation
    python benchmarks/camvid.py --variant frozen      # same recipe, frozen backbone
    python benchmarks/camvid.py --rescore             # score a finished run again with today's inference code

Each variant writes results/camvid-<variant>.json; the table in README.md is rebuilt from
every variant's JSON found there. Training runs go to benchmarks/runs/ (not committed).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import BENCH_DIR, SHARED_DATA, machine_info, update_readme_section, write_json
from everseg.data import load_camvid
from everseg.evaluate import evaluate
from everseg.learn import load_config, train
from everseg.devices import cpu_has_native_bf16
from everseg.models import load_model
from everseg.models.decoders import aspp_rates_for_crop

VARIANTS = {
    "pretrained": {},
    "random": {"model.pretrained": False},
    "frozen": {"train.finetune": "frozen"},
}
PUBLISHED = [("SegNet", 46.4), ("FCN-8", 57.0), ("DeepLab-LargeFOV", 61.6), ("Bayesian SegNet", 63.1),
             ("Dilation8", 65.3), ("FC-DenseNet103", 66.9)]
TTA = {"flip": {"flip": True}, "flip+ms": {"flip": True, "scales": (0.75, 1.0, 1.25)}}
CLASS_WEIGHT_NAMES = {"median_frequency": "median-freq.", "inverse_sqrt": "inverse-sqrt"}
CLASSES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
           "Pedestrian", "Bicyclist")


def short_cpu(name: str) -> str:
    """``"Intel(R) Xeon(R) Processor"`` -> ``"Intel Xeon"``; the rows come from two machines."""
    words = name.replace("(R)", "").replace("(TM)", "").split()
    return " ".join(w for w in words[:2] if w.lower() != "processor") or name


def result_name(variant: str, tag: str | None) -> str:
    return f"camvid-{variant}-{tag}" if tag else f"camvid-{variant}"


def plain_scores(model, test) -> dict:
    """Plain (one view) test metrics of ``model``."""
    ev = evaluate(model, test, autocast_bf16=cpu_has_native_bf16(), channels_last=True, progress=False)
    metrics = ev.metrics.to_dict(model.label_space)
    return {"test_images": ev.num_images, "test_resolution": "360x480", "miou": metrics["miou"],
            "pixel_accuracy": metrics["pixel_accuracy"], "mean_class_accuracy": metrics["mean_class_accuracy"],
            "per_class_iou": metrics["per_class_iou"], "inference_images_per_second": ev.images_per_second}


def tta_scores(model, test) -> dict:
    """Test mIoU with each test-time augmentation of TTA (softmax averaged over the views)."""
    out = {}
    for name, options in TTA.items():
        ev = evaluate(model, test, autocast_bf16=cpu_has_native_bf16(), channels_last=True, progress=False, **options)
        metrics = ev.metrics.to_dict(model.label_space)
        out[name] = {"miou": metrics["miou"], "per_class_iou": metrics["per_class_iou"],
                     "images_per_second": ev.images_per_second, **options}
    return out


def run_variant(variant: str, config: Path, data: Path, overrides: dict, resume: bool = False,
                tag: str | None = None) -> dict:
    cfg = load_config(config, {"data.path": str(data), **VARIANTS[variant], **overrides})
    out = BENCH_DIR / "runs" / result_name(variant, tag)
    machine = machine_info()  # at the start: the commit whose code is running
    start = time.perf_counter()
    fit = train(cfg, out, resume=resume and (out / "checkpoint.pt").is_file())
    train_minutes = fit.train_seconds / 60
    model = load_model(fit.model_dir)
    test = load_camvid(data, "test")
    result = {
        "variant": variant, "tag": tag, "machine": machine, "config": cfg.model_dump(mode="json"),
        "epochs": fit.epochs_run, "train_minutes": round(train_minutes, 2),
        "wall_minutes": round((time.perf_counter() - start) / 60, 2),
        "train_images_seen": fit.images_seen, **plain_scores(model, test), "tta": tta_scores(model, test),
    }
    if cfg.train.ema_decay:
        # The saved model is the weight average; the checkpoint keeps the trained weights of the
        # same run, so what the average adds is measured without a second run's noise.
        model.load_state_dict(torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)["model"])
        result["without_average"] = plain_scores(model, test)
    return result


def rescore(name: str, data: Path) -> dict:
    """Score a finished run again (plain and TTA) with the inference code of the current commit.

    Training is untouched; ``scored`` records the commit and date of the new scores so the
    table can say that they are not the training commit's.
    """
    path = BENCH_DIR / "results" / f"{name}.json"
    model_dir = BENCH_DIR / "runs" / name / "model"
    if not path.is_file() or not model_dir.is_dir():
        raise SystemExit(f"{path} or {model_dir} is missing: train the variant first")
    result = json.loads(path.read_text())
    model, test = load_model(model_dir), load_camvid(data, "test")
    result.update(plain_scores(model, test), tta=tta_scores(model, test), scored=machine_info())
    write_json(name, result)
    return result


def table() -> str:
    rows = []
    for path in sorted((BENCH_DIR / "results").glob("camvid-*.json")):
        rows.append(json.loads(path.read_text()))
    order = {v: i for i, v in enumerate(VARIANTS)}
    # Rows at the same budget sit together, the largest budget first; within it the untagged
    # (headline) run leads, then each tag.
    rows.sort(key=lambda r: (-(r["config"]["train"].get("max_minutes") or 0), r.get("tag") or "",
                             order.get(r["variant"], 99)))
    head = "| model | loss | mIoU | TTA flip / +scales | pixel acc. | train min (budget) | epochs | threads | machine | commit | " + " | ".join(CLASSES) + " |\n"
    head += "|---|---|---:|---:|---:|---:|---:|---:|---|---|" + "---:|" * len(CLASSES) + "\n"
    lines = []
    for r in rows:
        c = r["config"]
        name = (f"everseg {c['model']['arch']}/{c['model']['backbone']} OS{c['model']['output_stride']}, "
                f"{r['variant']}" + (f" [{r['tag']}]" if r.get("tag") else ""))
        per = " | ".join(f"{r['per_class_iou'][k]:.1f}" for k in CLASSES)
        t = c["train"]
        threads = t.get("threads") or r["machine"].get("torch_threads")
        tta = r.get("tta") or {}
        tta_s = " / ".join(f"{tta[k]['miou']:.1f}" if k in tta else "–" for k in TTA)
        loss = c.get("loss", {}).get("kind", "ce")
        weights = c.get("loss", {}).get("class_weights", "none")
        if weights != "none":
            loss += f", {CLASS_WEIGHT_NAMES.get(str(weights), weights)} weights"
        commit = r["machine"]["commit"]
        if r.get("scored") and r["scored"]["commit"] != commit:
            commit += f" (scored {r['scored']['commit']})"
        rates = c["model"].get("aspp_rates")
        if rates == "auto":
            rates = f"auto = {aspp_rates_for_crop(c['data']['crop_size'], c['model']['output_stride'])}"
        if rates is not None:
            name += f", ASPP rates {rates}"
        lines.append(f"| **{name}** | {loss} | **{r['miou']:.1f}** | {tta_s} | {r['pixel_accuracy']:.1f} | {r['train_minutes']:.0f} "
                     f"({t.get('max_minutes') or '-'}) | {r['epochs']} | {threads} | {short_cpu(r['machine']['cpu'])} | {commit} | {per} |")
    for name, miou in PUBLISHED:
        lines.append(f"| {name} (published) | | {miou} | | | | | | | |" + " |" * len(CLASSES))
    machine = rows[0]["machine"] if rows else machine_info()
    data_note = ""
    if rows:
        c = rows[0]["config"]["data"]
        data_note = (f"Trained on the `{c['train_split']}` split "
                     f"({'train 367 + val 101 images, no model selection: the last epoch is kept' if c['train_split'] == 'trainval' else 'train 367 images'}); ")
    return (f"## CamVid-11 (`python benchmarks/camvid.py [--variant pretrained|random|frozen]`)\n\n"
            f"{data_note}evaluated on the 233 test images at 360x480, whole-image inference; `mIoU` without "
            f"test-time augmentation, `TTA` with the horizontal flip and with flip and scales 0.75, 1, 1.25 "
            f"(softmax averaged). `commit` made the model; `scored` names a later commit whose inference code scored it again (`--rescore`). Each row on 2 cores of the `machine` named, torch {machine['torch']}; the same recipe trains about 13 % slower on the Intel Xeon than on the AMD EPYC (`benchmarks/speed.py`: 5.66 against 6.54 img/s), so it gets fewer epochs in a time budget."
            f"\n\n" + head + "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=list(VARIANTS), default="pretrained")
    parser.add_argument("--config", type=Path, default=BENCH_DIR.parent / "configs" / "camvid.yaml")
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "camvid")
    parser.add_argument("--set", action="append", default=[], help="config override section.field=value")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run of this variant")
    parser.add_argument("--tag", help="keep this run apart from the variant's headline run, e.g. a smaller "
                                      "budget: results/camvid-<variant>-<tag>.json")
    parser.add_argument("--rescore", action="store_true",
                        help="no training: score the variant's finished run again, plain and with "
                             "test-time augmentation, with the current inference code")
    args = parser.parse_args()
    from everseg.learn import parse_override

    if args.rescore:
        result = rescore(result_name(args.variant, args.tag), args.data)
        update_readme_section("camvid", table())
        print(json.dumps({"miou": result["miou"], **{k: v["miou"] for k, v in result["tta"].items()}}, indent=2))
        return

    overrides = dict(parse_override(s) for s in args.set)
    result = run_variant(args.variant, args.config, args.data, overrides, resume=args.resume, tag=args.tag)
    write_json(result_name(args.variant, args.tag), result)
    update_readme_section("camvid", table())
    print(json.dumps({k: result[k] for k in ("variant", "miou", "train_minutes", "epochs")}, indent=2))


if __name__ == "__main__":
    main()
