"""What every benchmark records beside its numbers: the machine, the date, the software."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
SHARED_DATA = BENCH_DIR.parent.parent / "shared" / "data"


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError):
        mem_gib = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=BENCH_DIR, check=False).stdout.strip() or None
        # A result from code that is not the commit's must not pass for the commit's.
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/src", ":/configs",
                                  ":/benchmarks/*.py"], capture_output=True, text=True, cwd=BENCH_DIR,
                                 check=False).stdout.strip()
        if commit and changed:
            commit += "-dirty"
    except OSError:
        commit = None
    return {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu,
            "cores": os.cpu_count(), "memory_gib": round(mem_gib, 1) if mem_gib else None,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "commit": commit}


def write_json(name: str, data: dict[str, Any]) -> Path:
    from everseg.atomic import atomic_write_json

    path = BENCH_DIR / "results" / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    atomic_write_json(path, data)  # benchmarks may run side by side; a reader never sees half a file
    return path


def update_readme_section(name: str, markdown: str) -> None:
    """Replace the block between the section's markers in benchmarks/README.md."""
    readme = BENCH_DIR / "README.md"
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{markdown.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    readme.write_text(text)
