"""The online learner from a fresh start: the `everseg demo` model (no stored replay memory, as a
new service has), a 20-image CamVid validation holdout, 20 test images at 360x480 corrected one
at a time through ``OnlineLearner.observe``. How many updates the guardrail accepts, the holdout
mIoU before and after, and where an update's time goes.

    .venv/bin/python benchmarks/online_fresh.py      # every variant, about 20 minutes on 2 cores

Variants: the defaults, the old learning rate, and ways to buy a faster update. The corrections
and the holdout are the ones `benchmarks/serve.py` sends through the service. Writes
results/online_fresh.json and its section of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import shutil
import time

import numpy as np

from common import BENCH_DIR, SHARED_DATA, machine_info, update_readme_section, write_json
from serve import RUNS, correction_picks, demo_model, write_folder


# (name, OnlineLearner options): the defaults, the learning rate they replaced, and the ways to
# buy a faster update (a frozen backbone, whose guardrail reuses the holdout's backbone features;
# less replay; a smaller training crop; both).
VARIANTS = [
    ("defaults", {}),
    ("lr 0.002 (the old default)", {"lr": 0.002}),
    ("frozen backbone (lr 0.01)", {"finetune": "frozen"}),
    ("frozen backbone, lr 0.0005", {"finetune": "frozen", "lr": 0.0005}),
    ("frozen backbone, replay 2", {"finetune": "frozen", "replay": 2}),
    ("frozen backbone, 3 steps", {"finetune": "frozen", "steps": 3}),
    ("frozen backbone, 3 steps, replay 2", {"finetune": "frozen", "steps": 3, "replay": 2}),
    ("replay 1", {"replay": 1}),
    ("crop 240x320", {"crop_size": (240, 320)}),
    ("frozen backbone + crop 240x320 (lr 0.01)", {"finetune": "frozen", "crop_size": (240, 320)}),
]


def run_variant(name: str, options: dict, model_dir, holdout, test, corrections: int) -> dict:
    from everseg.learn.online import OnlineLearner
    from everseg.models import load_model

    root = BENCH_DIR / "runs" / "online_fresh" / name.split(" (")[0].replace(" ", "-")
    shutil.rmtree(root, ignore_errors=True)
    learner = OnlineLearner(load_model(model_dir), root, holdout, **options)
    start_miou = learner.holdout_miou
    rows = []
    for i in correction_picks(len(test), corrections)[:corrections]:
        image, mask = test.decoded(i)
        obs = learner.observe(image, mask, stem=test.samples[i].stem)
        rows.append({"stem": test.samples[i].stem, "accepted": obs.accepted, "before": obs.holdout_miou_before,
                     "after": obs.holdout_miou_after, "seconds": obs.seconds, "timings": obs.timings,
                     "reason": obs.reason})
        print(f"{name}: {rows[-1]['stem']} {'accepted' if obs.accepted else 'rejected'} "
              f"{obs.holdout_miou_before:.1f} -> {obs.holdout_miou_after or float('nan'):.1f} in {obs.seconds:.1f} s"
              f"{' (' + obs.reason + ')' if obs.diverged else ''}", flush=True)
    return {"name": name, "options": options, "holdout_miou_start": start_miou,
            "holdout_miou_end": learner.holdout_miou, "accepted": sum(r["accepted"] for r in rows),
            "after_min": min(r["after"] if r["after"] is not None else float("nan") for r in rows),
            "after_max": max(r["after"] if r["after"] is not None else float("nan") for r in rows),
            "median_seconds": float(np.median([r["seconds"] for r in rows])),
            "median_timings": {k: float(np.median([r["timings"].get(k, 0.0) for r in rows]))
                               for k in ("train", "holdout", "publish")},
            "corrections": rows}


def table(result: dict) -> str:
    m = result["machine"]
    out = ["## Online learning from a fresh start (`python benchmarks/online_fresh.py`)", "",
           f"{m['date']}, commit {m['commit']}, {m['cpu']}, {m['cores']} cores, {m['torch_threads']} threads, "
           f"torch {m['torch']}, {'bfloat16' if m.get('bf16') else 'float32'}. The `everseg demo` model without a "
           f"stored replay memory (what a new service starts from), {result['holdout_images']} CamVid val images as "
           f"the guardrail's holdout (tolerance 1 point), {result['corrections']} CamVid test images (360x480) "
           "corrected one at a time with `OnlineLearner.observe`, each variant from the same start.", "",
           "| variant | accepted | holdout mIoU start -> end | candidates' holdout mIoU, min-max | "
           "seconds per update, median | train / holdout / publish |",
           "|---|---:|---:|---:|---:|---:|"]
    for v in result["variants"]:
        t = v["median_timings"]
        out.append(f"| {v['name']} | {v['accepted']} of {len(v['corrections'])} | {v['holdout_miou_start']:.1f} -> "
                   f"{v['holdout_miou_end']:.1f} | {v['after_min']:.1f}-{v['after_max']:.1f} | "
                   f"{v['median_seconds']:.1f} | {t['train']:.1f} / {t['holdout']:.1f} / {t['publish']:.2f} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=SHARED_DATA / "camvid")
    p.add_argument("--corrections", type=int, default=20)
    p.add_argument("--only", nargs="*", help="run only these variants (names as in the table)")
    args = p.parse_args()

    import torch

    from everseg.data import open_dataset
    from everseg.devices import cpu_has_native_bf16

    torch.set_num_threads(2)
    model_dir = demo_model()
    test = open_dataset(args.data, dataset="camvid", split="test")
    val = open_dataset(args.data, dataset="camvid", split="val")
    holdout = open_dataset(write_folder(RUNS / "holdout", val, list(range(0, len(val), 5))[:20], "val"),
                           dataset="folder", split="val")
    machine = {**machine_info(), "bf16": cpu_has_native_bf16()}
    variants = [run_variant(name, options, model_dir, holdout, test, args.corrections)
                for name, options in VARIANTS if not args.only or name in args.only]
    result = {"machine": machine, "holdout_images": len(holdout), "corrections": args.corrections,
              "variants": variants}
    # A partial run is a check, not the table: the results file and the README hold one whole run.
    if not args.only:
        write_json("online_fresh", result)
        update_readme_section("online_fresh", table(result))
    print(table(result))


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"{(time.perf_counter() - t0) / 60:.1f} min")
