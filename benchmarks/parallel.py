"""Data-parallel training on this machine: 2 processes x 1 thread (torchrun, gloo) against
1 process x 2 threads, the same CamVid recipe and global batch, one after the other.

    .venv/bin/python benchmarks/parallel.py            # about 10 minutes on 2 cores

Each run is `everseg train --config configs/camvid.yaml` for ``--minutes`` of training
(one epoch at most, no validation); the table has the training images per second (global:
all processes together), the loss at the end and the wall time including start-up. Writes
results/parallel.json and its section of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import BENCH_DIR, SHARED_DATA, machine_info, update_readme_section, write_json

RUNS = BENCH_DIR / "runs" / "parallel"
CONFIG = BENCH_DIR.parent / "configs" / "camvid.yaml"


def run(name: str, nproc: int, threads: int, minutes: float, data: Path) -> dict:
    out = RUNS / name
    if out.exists():
        shutil.rmtree(out)
    cmd = [str(Path(sys.executable).parent / "everseg"), "train", "--config", str(CONFIG), "--data", str(data),
           "--out", str(out), "--epochs", "1", "--set", f"train.max_minutes={minutes}",
           "--set", "data.val_split=null", "--no-progress"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    else:
        cmd += ["--set", f"train.threads={threads}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    wall = time.perf_counter() - start
    epoch = json.loads((out / "history.json").read_text())[0]
    return {"name": name, "processes": nproc, "threads_each": threads, "img_per_s": epoch["images_per_second"],
            "loss": epoch["loss"], "train_seconds": epoch["seconds"], "wall_seconds": wall}


def table(result: dict) -> str:
    m = result["machine"]
    lines = [f"## Data-parallel training (`python benchmarks/parallel.py`)", "",
             f"{m['date']}, commit {m['commit']}, {m['cpu']}, {m['cores']} cores, torch {m['torch']}. "
             f"configs/camvid.yaml (DeepLabV3+/MobileNetV2, 288x384 crops, global batch 8) for "
             f"{result['minutes']} minutes of training each, one run after the other; img/s counts the "
             f"images of all processes.", "",
             "| run | processes x threads | img/s | loss after the budget | wall s (start-up included) |",
             "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['processes']} x {r['threads_each']} | {r['img_per_s']:.2f} | "
                     f"{r['loss']:.3f} | {r['wall_seconds']:.0f} |")
    a, b = result["rows"]
    lines += ["", f"2 processes x 1 thread / 1 process x 2 threads: {b['img_per_s'] / a['img_per_s']:.2f}x "
                  f"the images per second."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=SHARED_DATA / "camvid")
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--report", action="store_true", help="only write the README section from the results")
    args = p.parse_args()
    if args.report:
        update_readme_section("parallel", table(json.loads((BENCH_DIR / "results" / "parallel.json").read_text())))
        return
    rows = [run("one-process", 1, 2, args.minutes, args.data), run("two-processes", 2, 1, args.minutes, args.data)]
    result = {"machine": machine_info(), "minutes": args.minutes, "rows": rows}
    write_json("parallel", result)
    update_readme_section("parallel", table(result))
    print(table(result))


if __name__ == "__main__":
    main()
