"""Defaults fitted to the data against the built-in defaults, the CamVid recipe and a tuning
study, on datasets unlike CamVid, all at the same time budget; scored on held-out test images.

    .venv/bin/python benchmarks/fit_to_data.py --minutes 6 --trials 6       # ~2 h for both datasets
    .venv/bin/python benchmarks/fit_to_data.py --datasets isbi-em --minutes 6 --trials 6

Datasets (built under benchmarks/runs/fit-to-data/data, from ../shared/data):
- ``camvid-small``: CamVid at 180x240, the size of small everyday photos (train 367, val 101, test 233);
- ``isbi-em``: the 30 grayscale 512x512 electron-microscopy slices, 2 classes (membrane, cell):
  train 20 (2 of them held out for validation), test 10.

Rows: ``defaults`` (``data.fit_to_data=false``: 320x320 crops, scale 0.5-2.0, batch 8, CE),
``camvid-recipe`` (configs/camvid.yaml unchanged but for the splits), ``fitted`` (no config:
``everseg train --data FOLDER``) and ``study`` (``everseg tune`` from no config over a space around
the data's own sizes, then its best.yaml trained like the others). Every run has ``--minutes``
(the time budget binds: epochs are set high) and keeps its best validation epoch.
Writes results/fit-to-data.json and its section of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import BENCH_DIR, SHARED_DATA, machine_info, update_readme_section, write_json

RUNS = BENCH_DIR / "runs" / "fit-to-data"
CAMVID_NAMES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                "Pedestrian", "Bicyclist"]
GOAL = 1.0  # mIoU points the fitted defaults may trail the study by (issue 17)


def build_camvid_small(src: Path, dst: Path) -> Path:
    if (dst / "classes.txt").is_file():
        return dst
    (dst / "images").mkdir(parents=True, exist_ok=True)
    (dst / "masks").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        stems = sorted(p.stem for p in (src / split).glob("*.png"))
        for s in stems:
            Image.open(src / split / f"{s}.png").convert("RGB").resize((240, 180), Image.BICUBIC).save(
                dst / "images" / f"{s}.jpg", quality=90)
            m = np.array(Image.open(src / f"{split}annot" / f"{s}.png"))
            Image.fromarray(np.where(m == 11, 255, m).astype(np.uint8)).resize((240, 180), Image.NEAREST).save(
                dst / "masks" / f"{s}.png")
        (dst / f"{split}.txt").write_text("\n".join(stems) + "\n")
    (dst / "classes.txt").write_text("\n".join(CAMVID_NAMES) + "\n")
    return dst


def build_isbi(src: Path, dst: Path) -> Path:
    if (dst / "classes.txt").is_file():
        return dst
    (dst / "images").mkdir(parents=True, exist_ok=True)
    (dst / "masks").mkdir(parents=True, exist_ok=True)
    stems = sorted((p.stem for p in (src / "images").glob("*.png")), key=int)
    for s in stems:
        for sub in ("images", "masks"):
            link = dst / sub / f"{s}.png"
            if not link.exists():
                link.symlink_to((src / sub / f"{s}.png").resolve())
    # Every third slice is a test slice: the stack's neighbours are alike, so the test spans it.
    test = [s for i, s in enumerate(stems) if i % 3 == 2]
    (dst / "train.txt").write_text("\n".join(s for s in stems if s not in test) + "\n")
    (dst / "test.txt").write_text("\n".join(test) + "\n")
    (dst / "classes.txt").write_text("membrane\ncell\n")
    return dst


def space_for(data: Path) -> str:
    """A search space around the data's own image size (the CamVid space's crops do not fit it)."""
    from everseg.data import open_dataset
    from everseg.data.fingerprint import _crop, fingerprint

    fp = fingerprint(open_dataset(data, split="train", cache="none"), max_images=50)
    h, w = _crop(fp.median_size)
    crops = sorted({(max(32, int(h * f) // 32 * 32), max(32, int(w * f) // 32 * 32)) for f in (0.75, 1.0, 1.25)})
    return "\n".join([
        "optim.lr: {low: 0.005, high: 0.06, log: true}",
        "optim.weight_decay: {low: 1.0e-5, high: 1.0e-3, log: true}",
        "train.batch_size: {choices: [4, 8, 16, 32]}",
        f"data.crop_size: {{choices: {json.dumps([list(c) for c in crops])}}}",
        "data.scale: {choices: [[0.5, 2.0], [0.6, 1.6], [0.75, 1.5]]}",
        "loss.kind: {choices: [ce, ce+dice]}",
        "loss.class_weights: {choices: [none, inverse_sqrt]}",
    ]) + "\n"


def everseg(*args: str) -> None:
    cmd = [str(Path(sys.executable).parent / "everseg"), *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def train_and_test(name: str, data: Path, minutes: float, config: list[str], sets: list[str]) -> dict:
    run = RUNS / "runs" / data.name / name
    budget = ["--set", f"train.max_minutes={minutes}", "--set", "train.epochs=1000"]
    start = time.perf_counter()
    everseg("train", *config, "--data", str(data), "--out", str(run), "--overwrite", "--no-progress",
            *[a for s in sets for a in ("--set", s)], *budget)
    seconds = time.perf_counter() - start
    metrics = run / "test.json"
    everseg("eval", "--model", str(run), "--data", str(data), "--split", "test", "--json", str(metrics),
            "--no-progress")
    m = json.loads(metrics.read_text())
    fitted = run / "fingerprint.json"
    saved = (run / "config.yaml").read_text()
    import yaml

    cfg = yaml.safe_load(saved)
    return {"row": name, "miou": m["miou"], "seconds": seconds,
            "crop": cfg["data"]["crop_size"], "scale": cfg["data"]["scale"], "batch": cfg["train"]["batch_size"],
            "lr": cfg["optim"]["lr"], "warmup": cfg["optim"]["warmup_epochs"],
            "loss": cfg["loss"]["kind"], "class_weights": cfg["loss"]["class_weights"],
            "fitted": json.loads(fitted.read_text())["chosen"] if fitted.is_file() else None}


def run_dataset(data: Path, minutes: float, trials: int) -> dict:
    splits = ["data.dataset=folder", "data.train_split=train", "data.val_split=val"]
    rows = [train_and_test("defaults", data, minutes, [], ["data.fit_to_data=false"]),
            train_and_test("camvid-recipe", data, minutes, ["--config", str(BENCH_DIR.parent / "configs" / "camvid.yaml")],
                           splits),
            train_and_test("fitted", data, minutes, [], [])]
    study = RUNS / "studies" / data.name
    space = RUNS / "spaces" / f"{data.name}.yaml"
    space.parent.mkdir(parents=True, exist_ok=True)
    space.write_text(space_for(data))
    resume = ["--resume"] if (study / "study.db").is_file() else []
    start = time.perf_counter()
    everseg("tune", "--data", str(data), "--trials", str(trials), "--minutes", str(minutes), "--space", str(space),
            "--out", str(study), "--set", "train.epochs=1000", *resume)
    study_minutes = (time.perf_counter() - start) / 60
    row = train_and_test("study", data, minutes, ["--config", str(study / "best.yaml")], [])
    # A resumed study runs only its missing trials: its cost is what all its trials took.
    with open(study / "trials.csv", newline="") as f:
        row["study_minutes"] = max(study_minutes, sum(float(t["minutes"]) for t in csv.DictReader(f)))
    row["study_resumed"] = bool(resume)
    row["trials_md"] = (study / "trials.md").read_text()
    rows.append(row)
    return {"dataset": data.name, "rows": rows}


def table(result: dict) -> str:
    m = result["machine"]
    lines = ["## Defaults fitted to the data (`python benchmarks/fit_to_data.py`)", "",
             f"{m['date']}, commit {m['commit']}, {m['cpu']}, {m['cores']} cores, torch {m['torch']}. Every row "
             f"trains {result['minutes']:g} minutes (ImageNet MobileNetV2 + DeepLabV3+), keeps its best validation "
             f"epoch and is scored on the test images. `study`: `everseg tune` of {result['trials']} trials of "
             f"{result['minutes']:g} minutes from no config, then its best.yaml trained again. Goal: `fitted` within "
             f"{GOAL:g} mIoU of `study`.", "",
             "| dataset | row | test mIoU | crop | scale | batch | LR | warm-up epochs | loss | class weights |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for ds in result["datasets"]:
        for r in ds["rows"]:
            lr = f"{r['lr']:.3g} | {r['warmup']:g}" if "lr" in r else "– | –"  # not recorded before ba3204c
            lines.append(f"| {ds['dataset']} | {r['row']} | {r['miou']:.1f} | {r['crop']} | {r['scale']} | {r['batch']} "
                         f"| {lr} | {r['loss']} | {r['class_weights']} |")
    for ds in result["datasets"]:
        dm = ds.get("machine", m)
        if dm["commit"] != m["commit"]:
            lines += ["", f"{ds['dataset']}'s rows: {dm['date']}, commit {dm['commit']} (not rerun with the others)."]
    for ds in result["datasets"]:
        by = {r["row"]: r for r in ds["rows"]}
        if "study" in by and "fitted" in by:
            gap = by["study"]["miou"] - by["fitted"]["miou"]
            lines += ["", f"{ds['dataset']}: fitted {by['fitted']['miou']:.1f} against the study's "
                          f"{by['study']['miou']:.1f} ({-gap:+.1f}; goal within {GOAL:g}: "
                          f"{'met' if gap <= GOAL else 'missed'}); the study took {by['study']['study_minutes']:.0f} minutes{' (its trials ran before, at an earlier commit: this run resumed it)' if by['study'].get('study_resumed') else ''}."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--report", action="store_true", help="rewrite the README section from results/fit-to-data.json")
    p.add_argument("--datasets", nargs="+", default=["camvid-small", "isbi-em"], choices=["camvid-small", "isbi-em"])
    p.add_argument("--minutes", type=float, default=6.0)
    p.add_argument("--trials", type=int, default=6)
    args = p.parse_args()
    if args.report:
        result = json.loads((BENCH_DIR / "results" / "fit-to-data.json").read_text())
        update_readme_section("fit-to-data", table(result))
        print(table(result))
        return
    built = {"camvid-small": lambda: build_camvid_small(SHARED_DATA / "camvid", RUNS / "data" / "camvid-small"),
             "isbi-em": lambda: build_isbi(SHARED_DATA / "isbi-em", RUNS / "data" / "isbi-em")}
    machine = machine_info()
    fresh = [{**run_dataset(built[name](), args.minutes, args.trials), "machine": machine} for name in args.datasets]
    # A dataset not rerun keeps its rows, which name the commit that made them.
    previous = BENCH_DIR / "results" / "fit-to-data.json"
    kept = []
    if previous.is_file():
        old = json.loads(previous.read_text())
        if (old["minutes"], old["trials"]) == (args.minutes, args.trials):
            kept = [{"machine": old["machine"], **d} for d in old["datasets"] if d["dataset"] not in args.datasets]
    result = {"machine": machine, "minutes": args.minutes, "trials": args.trials, "datasets": fresh + kept}
    write_json("fit-to-data", result)
    update_readme_section("fit-to-data", table(result))
    print(table(result))


if __name__ == "__main__":
    main()
