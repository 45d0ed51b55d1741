"""Incremental learning on CamVid: every strategy against finetune and joint, plus the stream.

    python benchmarks/continual.py                                   # all protocols and strategies
    python benchmarks/continual.py --protocols camvid-6-1 --strategies mib,plop+replay
    python benchmarks/continual.py --table                           # only rebuild JSON + table
    python benchmarks/continual.py --stream                          # OnlineLearner on the dusk stream

Recipe: configs/camvid.yaml (model, augmentation, optimiser, loss), on the 367 training
images; every model is tested on the 233 test images at 360x480.

Budgets: step 0 is trained once (``--base-minutes``; ``--domain-base-minutes`` for the
0016E5 model of camvid-domains) and shared by every strategy, so their differences are
the incremental steps alone. ``joint`` retrains from the ImageNet backbone at every step
on all images so far with the base budget. Each incremental step gets ``--step-share`` of
that (0.15 = the goal's ceiling); the LR schedule decays within the step's budget.
camvid-6-1's joint reference is camvid-6-5's: their last steps train the same images with
the same classes (camvid-10-1-disjoint's is camvid-10-1-overlap's likewise).

Runs go to benchmarks/runs/continual/<protocol>/<strategy>/ and are reused when complete,
so two processes can share the work (``--strategies`` disjoint, one thread each) and
``--table`` merges them into results/continual-<protocol>.json and README.md (a protocol with
no run on this disk keeps its committed JSON and table). ``--tag T``
keeps a run at another budget apart: runs/continual-T/, results/continual-<protocol>-T.json
and a README section of its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import functools
import json
import os
import shutil
import sys
import time
from pathlib import Path

from common import BENCH_DIR, SHARED_DATA, machine_info, update_readme_section, write_json
from everseg.atomic import atomic_write_json
from everseg.data import open_dataset
from everseg.data.protocols import get_protocol
from everseg.data.scenarios import build_scenario
from everseg.evaluate.continual import ContinualReport
from everseg.learn import load_config
from everseg.learn.continual import run_scenario, untrained_domain_miou

STRATEGIES = ["finetune", "ewc", "mas", "weighting", "replay", "lwf", "ilt", "mib", "plop", "mer", "reptile+replay",
              "plop+replay", "mib+replay", "mib+ewf", "plop+ewf"]
PROTOCOLS = ["camvid-6-5", "camvid-6-1", "camvid-domains", "camvid-10-1-overlap", "camvid-10-1-disjoint"]
# Same images and classes at the last step (the disjoint steps' images together are all of them):
# one joint serves both.
JOINT_FROM = {"camvid-6-1": "camvid-6-5", "camvid-10-1-disjoint": "camvid-10-1-overlap"}
RUN_INFO = "benchmark-run.json"  # written beside a run's results.json
HOLDOUT_EVERY = 5  # stream: every 5th dusk image guards the updates instead of training them
PUBLISHED = "Published VOC 15-1 context: PLOP 54.6 of joint 77.4 (0.71x); SSUL-M 71.4 (0.92x)."


def _config(args, minutes: float):
    return load_config(args.config, {"data.path": str(args.data), "train.max_minutes": minutes,
                                     "train.epochs": 200, "train.threads": args.threads, **args.overrides})


@functools.lru_cache(maxsize=None)
def _open(data: Path, split: str):
    return open_dataset(data, split=split)  # decoding CamVid takes a while: once per split


def _scenario(protocol: str, args, steps: slice = slice(None)):
    spec = get_protocol(protocol)
    spec = dataclasses.replace(spec, steps=spec.steps[steps])
    return build_scenario(spec, _open(args.data, spec.train_split), _open(args.data, spec.test_split))


def _complete(run: Path, scenario) -> ContinualReport | None:
    try:
        report = ContinualReport.load(run)
    except ValueError:
        return None
    return report if len(report.steps) == len(scenario.steps) else None


def _base_dir(protocol: str, args) -> Path:
    """camvid-6-5 and camvid-6-1 share step 0 (folder ``class``); the other class protocols
    have a step 0 of their own (disjoint: without the images of later classes)."""
    if get_protocol(protocol).kind == "domain":
        return args.runs / "bases" / "domains"
    return args.runs / "bases" / ("class" if protocol in ("camvid-6-5", "camvid-6-1") else protocol)


def base_model(protocol: str, args) -> Path:
    """Step 0 of the protocol, trained once and shared by every strategy (and by joint).

    Training writes ``step0/model`` at every better epoch, so a model there is no finished
    base: a second process waits on the lock for the first one's base to be complete rather
    than starting from a half-trained one (as one did, unnoticed until its steps ran fast)."""
    run = _base_dir(protocol, args)
    scenario = _scenario(protocol, args, slice(0, 1))
    run.parent.mkdir(parents=True, exist_ok=True)
    with open(run.parent / f"{run.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _complete(run, scenario) is None:
            minutes = args.domain_base_minutes if run.name == "domains" else args.base_minutes
            # An unfinished base is this script's own leftover: start it again.
            run_scenario(scenario, "finetune", _config(args, minutes), run, progress=False, overwrite=run.exists())
    return run / "step0" / "model"


def run_strategy(protocol: str, name: str, args) -> ContinualReport:
    scenario = _scenario(protocol, args)
    run = args.runs / protocol / name
    done = None if args.redo else _complete(run, scenario)
    if done is not None:
        return done
    if args.redo and run.is_symlink():
        # A link shares another tag's run (a joint, a base): rerunning here must leave that run
        # alone, so the link gives way to a folder of this tag's own.
        run.unlink()
    base = base_model(protocol, args)
    minutes = args.domain_base_minutes if scenario.spec.kind == "domain" else args.base_minutes
    cfg = _config(args, minutes)
    # Which code and machine made this run: the table is collected later, often at another commit.
    made = {**machine_info(), "threads": args.threads, "command": args.command}
    if name == "joint":
        report = run_scenario(scenario, "joint", cfg, run, base_model=base, overwrite=args.redo, progress=False)
    else:
        parts = name.split("+")
        params = {k: v for k, v in args.params.items() if k.partition(".")[0] in parts}
        report = run_scenario(scenario, name, cfg, run, base_model=base, step_minutes=args.step_share * minutes,
                              memory_size=args.memory, params=params, overwrite=args.redo, progress=False)
    atomic_write_json(run / RUN_INFO, made)
    return report


def run_info(run: Path) -> dict:
    """The commit and threads a finished run was made with ({} for runs older than this record)."""
    path = run / RUN_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


def _all_miou(report: ContinualReport) -> float | None:
    """Class protocols: mIoU of every class so far. Domains: the mean of the domains' mIoUs."""
    last = report.steps[-1]
    if report.kind == "domain":
        vals = [v for v in last.domain_miou.values() if v is not None]
        return sum(vals) / len(vals) if vals else None
    return last.all_miou


def summarise(report: ContinualReport, joint: ContinualReport | None) -> dict:
    last, joint_last = report.steps[-1], (joint.steps[-1] if joint else None)
    retrain = joint_last.seconds if joint_last else None  # what one joint retraining costs
    inc = report.steps[1:]
    ours, reference = _all_miou(report), (_all_miou(joint) if joint else None)
    return {
        "strategy": report.strategy, "old_miou": last.old_miou if report.kind == "class" else None,
        "new_miou": last.new_miou if report.kind == "class" else None,
        "all_miou": ours, "average_incremental_miou": report.average_incremental_miou(),
        "backward_transfer": report.backward_transfer(), "forward_transfer": report.forward_transfer(),
        "forgetting": report.forgetting(), "domain_miou_last": last.domain_miou,
        "ratio_to_joint": ours / reference if ours is not None and reference else None,
        "step_seconds": [r.seconds for r in report.steps], "step_images_seen": [r.images_seen for r in report.steps],
        "joint_retrain_seconds": retrain,
        "max_step_share_of_joint": max(r.seconds for r in inc) / retrain if retrain and inc else None,
    }


def collect(protocol: str, args) -> dict:
    """Everything finished for ``protocol``, whichever process ran it."""
    scenario = _scenario(protocol, args)
    joint_dir = args.runs / JOINT_FROM.get(protocol, protocol) / "joint"
    joint = _complete(joint_dir, _scenario(JOINT_FROM.get(protocol, protocol), args))
    out = {"protocol": protocol, "machine": machine_info(), "base_minutes": args.base_minutes,
           "domain_base_minutes": args.domain_base_minutes, "step_share": args.step_share,
           "memory_size": args.memory, "threads": args.threads, "joint_from": os.path.relpath(joint_dir, BENCH_DIR),
           "config": _config(args, args.base_minutes).model_dump(mode="json"), "strategies": {}}
    base_dir = _base_dir(protocol, args)
    base = _complete(base_dir, _scenario(protocol, args, slice(0, 1)))
    if base is not None and scenario.spec.kind == "domain" and not base.initial_domain_miou:
        # A base trained before its report carried the untrained model's scores: measure them
        # once (the same seeded model step 0 started from) so forward transfer can be shown.
        from everseg.devices import cpu_has_native_bf16

        base.initial_domain_miou = untrained_domain_miou(scenario, _config(args, args.domain_base_minutes),
                                                         cpu_has_native_bf16())
        base.save(base_dir)
    for name in ["joint"] + STRATEGIES:
        report = joint if name == "joint" else _complete(args.runs / protocol / name, scenario)
        if report is not None:
            if base is not None and not report.initial_domain_miou:
                # Runs that share the base did not see the untrained model; the base run did (FWT).
                report.initial_domain_miou = base.initial_domain_miou
            out["strategies"][name] = summarise(report, joint)
            info = run_info(joint_dir if name == "joint" else args.runs / protocol / name)
            out["strategies"][name]["made_at"] = {k: info.get(k) for k in ("commit", "date", "threads")}
    name = f"continual-{protocol}" + (f"-{args.tag}" if args.tag else "")
    out["tag"], out["command"] = args.tag, reproduce_command(protocol, list(out["strategies"]), args)
    if set(out["strategies"]) - {"joint"}:  # joint alone is only another protocol's reference
        write_json(name, out)
        return out
    # No strategy of this protocol on this disk (runs are not committed, a fresh machine has
    # none): its table stays the committed one rather than vanishing from the README.
    saved = BENCH_DIR / "results" / f"{name}.json"
    return json.loads(saved.read_text()) if saved.is_file() else out


def reproduce_command(protocol: str, strategies: list[str], args) -> str:
    """The one command that remakes every row of a protocol's table at its budget.

    Derived from the budget rather than copied from argv: the runs of one table are often made
    by several invocations (two processes, reruns), and any of them alone would mislead.
    """
    parts = ["OMP_NUM_THREADS=1 python benchmarks/continual.py --threads 1"]
    if args.tag:
        parts.append(f"--tag {args.tag}")
    for flag, value, default in (("--base-minutes", args.base_minutes, 15.0),
                                 ("--domain-base-minutes", args.domain_base_minutes, 10.0),
                                 ("--step-share", args.step_share, 0.15), ("--memory", args.memory, 20)):
        if value != default:
            parts.append(f"{flag} {value:g}")
    parts += [f"--set {k}={v}" for k, v in args.overrides.items()]
    parts += [f"--param {k}={v}" for k, v in args.params.items()]
    parts.append(f"--protocols {protocol} --strategies {','.join(strategies)}")
    return " ".join(parts)


def table(all_results: list[dict], tag: str | None = None) -> str:
    fmt = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
    title = "## Incremental learning on CamVid" + (f" [{tag}]" if tag else "")
    out = [f"{title} (`python benchmarks/continual.py{f' --tag {tag}' if tag else ''}`)", "",
           "After the last step, on the 233 test images at 360x480 (the synthetic background class is left out "
           "of every mean). `ratio` = all-classes mIoU / joint's; `step time` = the longest incremental step's "
           "wall time / one joint retraining's; BWT = backward transfer (negative = forgetting). On camvid-domains "
           "`mean` is the mean of the day (Seq05VD) and dusk (0001TP) test mIoUs, `ratio` is against joint's mean and "
           "FWT is the gain on a domain before training on it, over the untrained model. " + PUBLISHED, ""]
    for res in all_results:
        m, domain = res["machine"], res["protocol"] == "camvid-domains"
        base = res["domain_base_minutes"] if domain else res["base_minutes"]
        out += [f"### {res['protocol']}", "",
                f"Collected {m['date']} on {m['cpu']}; the commit that made each run is in the last column (– = "
                f"not recorded: runs older than that record). 1 thread per run, two runs at a time; step 0 and "
                f"each joint retraining {base:g} min, each incremental step {res['step_share'] * base:.2f} min; "
                f"replay memory {res['memory_size']} images; joint from `{res['joint_from']}`. Remade by "
                f"`{res['command']}`.", ""]
        if domain:
            out += ["| strategy | day mIoU | dusk mIoU | mean | ratio | BWT | FWT | step time | commit |",
                    "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        else:
            out += ["| strategy | old mIoU | new mIoU | all mIoU | ratio | avg. incr. mIoU | BWT | step time "
                    "| commit |",
                    "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for name, r in res["strategies"].items():
            share, ratio = r["max_step_share_of_joint"], r["ratio_to_joint"]
            ratio_s = "–" if ratio is None else f"{ratio:.2f}"
            share_s = "–" if share is None else f"{100 * share:.1f}%"
            commit = (r.get("made_at") or {}).get("commit") or "–"
            if domain:
                d = r["domain_miou_last"]
                out.append(f"| {name} | {fmt(d.get('day'))} | {fmt(d.get('dusk'))} | {fmt(r['all_miou'])} | "
                           f"{ratio_s} | {fmt(r['backward_transfer'])} | {fmt(r['forward_transfer'])} | {share_s} | "
                           f"{commit} |")
            else:
                out.append(f"| {name} | {fmt(r['old_miou'])} | {fmt(r['new_miou'])} | {fmt(r['all_miou'])} | "
                           f"{ratio_s} | {fmt(r['average_incremental_miou'])} | {fmt(r['backward_transfer'])} | "
                           f"{share_s} | {commit} |")
        out.append("")
    return "\n".join(out)


def run_stream(args) -> dict:
    """Start from the 0016E5 model; stream the 62 dusk (0001TP) training images one by one."""
    from matplotlib.figure import Figure

    from everseg.evaluate import evaluate
    from everseg.learn.memory import ReplayMemory
    from everseg.learn.online import OnlineLearner
    from everseg.devices import cpu_has_native_bf16
    from everseg.models import load_model

    scenario = _scenario("camvid-domains", args)
    pool = _open(args.data, "train")
    base_dir = base_model("camvid-domains", args)
    stream = sorted((i for i, s in enumerate(pool.samples) if s.group == "0001TP"), key=lambda i: pool.samples[i].stem)
    holdout = _open(args.data, "val")
    holdout = holdout.subset(range(0, len(holdout), 5))  # 21 day images guard the updates
    bf16 = cpu_has_native_bf16()
    curves = {}
    runs = args.runs / "stream"

    def base_memory() -> ReplayMemory:
        # What the 0016E5 model learned from: each update rehearses the day images too.
        memory = ReplayMemory(args.memory, policy="class_balanced")
        memory.update(scenario.steps[0].train, step=0)
        return memory

    # Both learners hold out the same stream images (every HOLDOUT_EVERY-th), so both train on the same ones.
    setups = (("online (replay + guardrail)", {"memory": base_memory(), "tolerance": 1.0}),
              ("fine-tuning (no replay, no guardrail)", {"memory_size": 0, "tolerance": 1e9, "class_weights": "none"}))
    for label, kwargs in setups:
        shutil.rmtree(runs / label.split()[0], ignore_errors=True)  # a fresh registry: versions count from 1
        learner = OnlineLearner(load_model(base_dir), runs / label.split()[0], holdout, crop_size=(288, 384),
                                holdout_every=HOLDOUT_EVERY, **kwargs)
        points, start = [], time.perf_counter()
        for n, i in enumerate([None] + stream):
            if i is not None:
                image, mask = pool.decoded(i)
                learner.observe(image, mask, stem=pool.samples[i].stem)
            if n % args.stream_every == 0 or n == len(stream):
                scores = {d: evaluate(learner.model, v, autocast_bf16=bf16, progress=False).metrics.miou
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
    result = {"machine": machine_info(), "threads": args.threads, "memory_size": args.memory,
              "holdout_every": HOLDOUT_EVERY, "curves": curves}
    write_json("stream", result)
    return result


def stream_table(result: dict) -> str:
    m = result["machine"]
    out = ["## Stream: dusk images one at a time (`python benchmarks/continual.py --stream`)", "",
           f"{m['date']}, commit {m['commit']}, {m['cpu']}, {result.get('threads')} thread(s). Start: the 0016E5 "
           "model of camvid-domains; the 62 dusk (0001TP) training images arrive one by one, every "
           f"{result.get('holdout_every')}th is held out (the guardrail scores it from then on; neither learner trains "
           "on it). `OnlineLearner`: 4 gradient steps per image, class-weighted (inverse sqrt of the pixel counts of "
           f"what it trains on), with replay from a {result.get('memory_size')}-image class-balanced memory that "
           "starts with the 0016E5 training images; published only if the mIoU on 21 day validation images plus "
           "the held-out dusk images drops by at most 1 point. Fine-tuning: the same steps, no weighting, no "
           "replay, every update published. Test mIoU on day (Seq05VD) and dusk (0001TP) test images; "
           "plot: `results/stream.png`.", "",
           "| images streamed | " + " | ".join(f"{label}: day / dusk (version)" for label in result["curves"]) + " |",
           "|---:|" + "---:|" * len(result["curves"])]
    curves = list(result["curves"].values())
    for k, point in enumerate(curves[0]):
        cells = []
        for pts in curves:
            q = pts[k] if k < len(pts) else None
            cells.append("–" if q is None else f"{q['day']:.1f} / {q['dusk']:.1f} (v{q['version']})")
        out.append(f"| {point['images']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "camvid")
    parser.add_argument("--config", type=Path, default=BENCH_DIR.parent / "configs" / "camvid.yaml")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--strategies", default=",".join(["joint"] + STRATEGIES))
    parser.add_argument("--base-minutes", type=float, default=15.0,
                        help="budget of step 0 and of each joint retraining (class protocols)")
    parser.add_argument("--domain-base-minutes", type=float, default=10.0, help="the same for camvid-domains")
    parser.add_argument("--step-share", type=float, default=0.15, help="incremental step budget / base budget")
    parser.add_argument("--memory", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    parser.add_argument("--redo", action="store_true", help="rerun strategies that already finished (replacing their runs)")
    parser.add_argument("--table", action="store_true", help="only collect finished runs into JSON + table")
    parser.add_argument("--stream", action="store_true", help="run the OnlineLearner stream experiment instead")
    parser.add_argument("--stream-every", type=int, default=10, help="evaluate every N streamed images")
    parser.add_argument("--set", action="append", default=[], help="config override section.field=value")
    parser.add_argument("--param", action="append", default=[],
                        help="strategy hyper-parameter strategy.argument=value (e.g. plop.init=random), "
                             "given to each run whose strategy includes it")
    parser.add_argument("--tag", default=None, help="a name for runs at another budget: kept apart from the main table")
    parser.add_argument("--runs", type=Path, default=None, help="where runs go (default runs/continual[-TAG])")
    args = parser.parse_args()
    if args.runs is not None and args.tag is None:
        # The untagged table (results/continual-<protocol>.json and its README section) is the
        # main one: an experiment elsewhere must not rewrite it.
        parser.error("--runs needs a --tag: without one, the runs' table would replace the main table")
    args.runs = (args.runs or BENCH_DIR / "runs" / ("continual" + (f"-{args.tag}" if args.tag else ""))).resolve()
    # Recorded with each run it makes: which invocation (budget, overrides) produced it.
    args.command = "python benchmarks/continual.py " + " ".join(sys.argv[1:])
    import torch

    from everseg.learn import parse_override

    if args.threads:
        torch.set_num_threads(args.threads)  # evaluation too, not only the Trainer
    args.overrides = dict(parse_override(x) for x in args.set)
    args.params = {}
    for x in args.param:
        key, eq, value = x.partition("=")
        if not eq or "." not in key:
            parser.error(f"--param {x!r}: expected strategy.argument=value")
        args.params[key.strip()] = value.strip()
    if args.stream:
        update_readme_section("stream", stream_table(run_stream(args)))
        return
    protocols = [p for p in args.protocols.split(",") if p]
    if not args.table:
        for protocol in protocols:
            for name in [s for s in args.strategies.split(",") if s]:
                source = JOINT_FROM.get(protocol, protocol) if name == "joint" else protocol
                start = time.perf_counter()
                report = run_strategy(source, name, args)
                print(f"{protocol} {name}: all {report.steps[-1].all_miou} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
    stream = BENCH_DIR / "results" / "stream.json"
    if args.table and stream.is_file():
        update_readme_section("stream", stream_table(json.loads(stream.read_text())))
    results = {p: collect(p, args) for p in PROTOCOLS}
    update_readme_section("continual" + (f"-{args.tag}" if args.tag else ""),
                          table([r for r in results.values() if set(r["strategies"]) - {"joint"}], args.tag))
    print(json.dumps({p: {k: v["all_miou"] for k, v in results[p]["strategies"].items()} for p in protocols},
                     indent=2))


if __name__ == "__main__":
    main()
