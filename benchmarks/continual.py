"""Incremental learning on CamVid: every strategy against finetune and joint, plus the stream.

    python benchmarks/continual.py                                   # all protocols and strategies
    python benchmarks/continual.py --protocols camvid-6-1 --strategies mib,plop+replay
    python benchmarks/continual.py --stream                          # OnlineLearner on the dusk stream

Recipe: configs/camvid.yaml (model, augmentation, optimiser). Step 0 is trained once per
protocol (``--base-minutes``) and shared by every strategy; each later step trains
``--step-epochs`` epochs over its images. ``joint`` retrains from the ImageNet backbone at
every step on all images so far with the base budget. Results: results/continual-<protocol>.json
and a table in README.md; runs in benchmarks/runs/continual/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from common import BENCH_DIR, SHARED_DATA, machine_info, update_readme_section, write_json
from everseg.data import open_dataset
from everseg.data.protocols import get_protocol
from everseg.data.scenarios import build_scenario
from everseg.learn import load_config
from everseg.learn.continual import run_scenario

STRATEGIES = ["finetune", "ewc", "mas", "weighting", "replay", "lwf", "ilt", "mib", "plop", "mer+replay",
              "plop+replay", "mib+replay"]
PROTOCOLS = ["camvid-6-5", "camvid-6-1", "camvid-domains"]
PUBLISHED = ("Published VOC 15-1 context: PLOP 54.6 of joint 77.4 (0.71x); SSUL-M 71.4 (0.92x).")


def summarise(report, joint_report) -> dict:
    last = report.steps[-1]
    joint_last = joint_report.steps[-1] if joint_report else None
    inc = [r.seconds for r in report.steps[1:]]
    joint_inc = [r.seconds for r in joint_report.steps[1:]] if joint_report else []
    return {
        "strategy": report.strategy, "old_miou": last.old_miou, "new_miou": last.new_miou,
        "all_miou": last.all_miou, "average_incremental_miou": report.average_incremental_miou(),
        "backward_transfer": report.backward_transfer(), "forward_transfer": report.forward_transfer(),
        "ratio_to_joint": (last.all_miou / joint_last.all_miou) if joint_last and joint_last.all_miou else None,
        "step_seconds": [r.seconds for r in report.steps],
        "incremental_step_share_of_joint": (sum(inc) / sum(joint_inc)) if joint_inc and sum(joint_inc) else None,
        "domain_miou_last": last.domain_miou,
    }


def run_protocol(protocol: str, strategies: list[str], args) -> dict:
    spec = get_protocol(protocol)
    pool = open_dataset(args.data, split=spec.train_split)
    test = open_dataset(args.data, split=spec.test_split)
    scenario = build_scenario(spec, pool, test)
    cfg = load_config(args.config, {"data.path": str(args.data), "train.max_minutes": args.base_minutes,
                                    "train.epochs": args.base_epochs, **args.overrides})
    runs = args.runs / protocol
    results = {"protocol": protocol, "machine": machine_info(), "config": cfg.model_dump(mode="json"),
               "step_epochs": args.step_epochs, "memory_size": args.memory, "strategies": {}}
    # joint is the reference of every ratio, so it always runs.
    joint = run_scenario(scenario, "joint", cfg, runs / "joint", progress=False)
    results["strategies"]["joint"] = summarise(joint, joint)
    base = runs / "finetune" / "step0" / "model"
    for name in strategies:
        if name == "joint":
            continue
        start = time.perf_counter()
        report = run_scenario(scenario, name, cfg, runs / name, step_epochs=args.step_epochs,
                              base_model=base if base.is_dir() and name != "finetune" else None,
                              memory_size=args.memory, progress=False)
        results["strategies"][name] = summarise(report, joint) | {"wall_seconds": time.perf_counter() - start}
        write_json(f"continual-{protocol}", results)
        print(f"{protocol} {name}: all {report.steps[-1].all_miou}", flush=True)
    write_json(f"continual-{protocol}", results)
    return results


def table(all_results: list[dict]) -> str:
    fmt = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
    out = ["## Incremental learning on CamVid (`python benchmarks/continual.py`)", "",
           "After the last step, on the 233 test images at 360x480 (background left out of every mean). "
           "`ratio` = all-classes mIoU / joint's; `step time` = incremental steps' wall time / joint's. "
           + PUBLISHED, ""]
    for res in all_results:
        m = res["machine"]
        out += [f"### {res['protocol']} ({m['date']}, commit {m['commit']}, {res['step_epochs']} epochs per step, "
                f"memory {res['memory_size']} images)", "",
                "| strategy | old mIoU | new mIoU | all mIoU | ratio | avg. incr. mIoU | BWT | step time |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in res["strategies"].items():
            share, ratio = r.get("incremental_step_share_of_joint"), r.get("ratio_to_joint")
            out.append(f"| {name} | {fmt(r['old_miou'])} | {fmt(r['new_miou'])} | {fmt(r['all_miou'])} | "
                       f"{'–' if ratio is None else f'{ratio:.2f}'} | {fmt(r['average_incremental_miou'])} | "
                       f"{fmt(r['backward_transfer'])} | {'–' if share is None else f'{100 * share:.0f}%'} |")
        out.append("")
    return "\n".join(out)


def run_stream(args) -> dict:
    """Start from a model of sequence 0016E5; stream the 62 dusk (0001TP) training images one by one."""
    from matplotlib.figure import Figure

    from everseg.evaluate import evaluate
    from everseg.learn.online import OnlineLearner
    from everseg.learn.trainer import cpu_has_native_bf16
    from everseg.models import load_model

    spec = get_protocol("camvid-domains")
    pool, test = open_dataset(args.data, split="train"), open_dataset(args.data, split="test")
    scenario = build_scenario(spec, pool, test)
    runs = args.runs / "stream"
    base_dir = runs / "base" / "step0" / "model"
    if not base_dir.is_dir():
        cfg = load_config(args.config, {"data.path": str(args.data), "train.max_minutes": args.base_minutes,
                                        "train.epochs": args.base_epochs, **args.overrides})
        first = build_scenario(dataclasses.replace(spec, steps=spec.steps[:1]), pool, test)
        run_scenario(first, "finetune", cfg, runs / "base", progress=False)
    dusk = [i for i, s in enumerate(pool.samples) if s.group == "0001TP"]
    stream = sorted(dusk, key=lambda i: pool.samples[i].stem)
    holdout = open_dataset(args.data, split="val")
    holdout = holdout.subset(range(0, len(holdout), 5))  # 21 day images guard the updates
    bf16 = cpu_has_native_bf16()
    curves = {}
    for label, kwargs in (("online (replay + guardrail)", {"memory_size": args.memory, "tolerance": 1.0}),
                          ("fine-tuning (no replay, no guardrail)", {"memory_size": 0, "tolerance": 1e9})):
        learner = OnlineLearner(load_model(base_dir), runs / label.split()[0], holdout, crop_size=(288, 384),
                                **kwargs)
        points, start = [], time.perf_counter()
        for n, i in enumerate([None] + stream):
            if i is not None:
                image, mask = pool.decoded(i)
                learner.observe(image, mask, stem=pool.samples[i].stem)
            if n % args.stream_every == 0 or n == len(stream):
                scores = {d: 100 * evaluate(learner.model, v, autocast_bf16=bf16, progress=False).metrics.miou
                          for d, v in scenario.steps[0].tests.items()}
                points.append({"images": n, "version": learner.version, **scores,
                                "seconds": time.perf_counter() - start})
                print(label, points[-1], flush=True)
        curves[label] = points
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    for label, pts in curves.items():
        for domain, style in (("dusk", "-"), ("day", "--")):
            ax.plot([p["images"] for p in pts], [p[domain] for p in pts], style, marker="o", label=f"{domain}: {label}")
    ax.set_xlabel("dusk images streamed")
    ax.set_ylabel("test mIoU (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    (BENCH_DIR / "results").mkdir(exist_ok=True)
    fig.savefig(BENCH_DIR / "results" / "stream.png")
    result = {"machine": machine_info(), "curves": curves}
    write_json("stream", result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "camvid")
    parser.add_argument("--config", type=Path, default=BENCH_DIR.parent / "configs" / "camvid.yaml")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--base-minutes", type=float, default=20.0, help="time budget of step 0 and of each joint step")
    parser.add_argument("--base-epochs", type=int, default=40)
    parser.add_argument("--step-epochs", type=int, default=6)
    parser.add_argument("--memory", type=int, default=20)
    parser.add_argument("--stream", action="store_true", help="run the OnlineLearner stream experiment instead")
    parser.add_argument("--stream-every", type=int, default=10, help="evaluate every N streamed images")
    parser.add_argument("--set", action="append", default=[], help="config override section.field=value")
    parser.add_argument("--runs", type=Path, default=BENCH_DIR / "runs" / "continual", help="where runs go")
    args = parser.parse_args()
    from everseg.learn import parse_override

    args.overrides = dict(parse_override(x) for x in args.set)
    if args.stream:
        run_stream(args)
        return
    strategies = [s for s in args.strategies.split(",") if s]
    if strategies and strategies[0] != "finetune":
        strategies = ["finetune"] + [s for s in strategies if s != "finetune"]  # finetune trains the shared base
    results = [run_protocol(p, strategies, args) for p in args.protocols.split(",") if p]
    update_readme_section("continual", table(results))
    print(json.dumps({r["protocol"]: {k: v["all_miou"] for k, v in r["strategies"].items()} for r in results},
                     indent=2))


if __name__ == "__main__":
    main()
