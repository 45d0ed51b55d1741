"""Train the smaller models of the deployment table from one CamVid teacher, at the same budget.

    .venv/bin/python benchmarks/compress.py --teacher benchmarks/runs/deploy/camvid-teacher   # ~1 hour on 2 cores
    .venv/bin/python benchmarks/deploy.py --model benchmarks/runs/deploy/camvid-teacher \\
        --extra "pruned 40 %=benchmarks/runs/deploy/pruned40" ...                         # measures them

Every model trains with the teacher's own recipe (its run's config.yaml) for ``--epochs``
epochs (the teacher's 6 at its 40-minute budget: the same number of images seen), without a
time budget, so the machine's other load changes how long a run takes, not what it learns:

- ``student-plain``: ``everseg train`` of the student architecture, labels only;
- ``student-kd``: ``everseg distill`` of the same student, labels + pixel-wise KL (T = 1);
- ``student-kd-cwd``: the same + the channel-wise term (CWD, weight 3, T = 4);
- ``pruned40``: ``everseg compress --prune 0.4``, fine-tuned at half the recipe's LR with
  the unpruned teacher's pixel-wise KL;
- ``pruned20-d60``: the same with ``--prune 0.2 --prune-decoder 0.6`` (about as many MACs
  removed, most of them from the decoder).

A run whose model exists already is skipped (delete its folder to train it again). Writes
results/compress-runs.json: each run's command, wall time and the commit.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common import BENCH_DIR, machine_info, write_json

RUNS = BENCH_DIR / "runs" / "deploy"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", type=Path, default=RUNS / "camvid-teacher")
    p.add_argument("--student", default="lraspp/mobilenet_v2")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--prune", type=float, default=0.4)
    p.add_argument("--only", nargs="*",
                   help="run only these (student-plain, student-kd, student-kd-cwd, pruned40, pruned20-d60)")
    args = p.parse_args()
    recipe = args.teacher / "config.yaml"
    everseg = [str(Path(sys.executable).parent / "everseg")]
    common = ["--epochs", str(args.epochs), "--set", "train.max_minutes=null", "--no-progress"]
    arch = args.student.split("/")[0]
    backbone = args.student.split("/")[1]
    tag = f"pruned{round(100 * args.prune)}"
    jobs = {
        "student-kd": ["distill", "--teacher", str(args.teacher), "--student", args.student,
                       "--channel-weight", "0"],
        "student-plain": ["train", "--config", str(recipe), "--set", f"model.arch={arch}",
                          "--set", f"model.backbone={backbone}"],
        tag: ["compress", "--model", str(args.teacher), "--prune", str(args.prune),
              "--set", "optim.lr=0.01"],
        "pruned20-d60": ["compress", "--model", str(args.teacher), "--prune", "0.2", "--prune-decoder", "0.6",
                         "--set", "optim.lr=0.01"],
        "student-kd-cwd": ["distill", "--teacher", str(args.teacher), "--student", args.student,
                           "--channel-weight", "3"],
    }
    path = BENCH_DIR / "results" / "compress-runs.json"
    record = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    for name, cmd in jobs.items():
        if args.only and name not in args.only:
            continue
        out = RUNS / name
        if (out / "model" / "config.json").is_file():
            print(f"{name}: {out} exists, skipped", flush=True)
            continue
        full = everseg + cmd + ["--out", str(out)] + common
        print("$", shlex.join(full), flush=True)
        start = time.perf_counter()
        subprocess.run(full, check=True)
        record["runs"][name] = {"command": shlex.join(full[1:]), "minutes": (time.perf_counter() - start) / 60,
                                "machine": machine_info()}
        write_json("compress-runs", record)


if __name__ == "__main__":
    main()
