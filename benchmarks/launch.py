"""Benchmark 5: how long the launchers take, as whole processes (interpreter start included).

The CLIs must not import torch; when a command misses the 0.5 s target, ``python -X
importtime`` names the modules that cost the most, and the result lists them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import harness

TARGET_S = 0.5


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


COMMANDS = {
    "taskcodec --help": [_bin("taskcodec"), "--help"],
    "slurm-launch --help": [_bin("slurm-launch"), "--help"],
    "k8s-launch --help": [_bin("k8s-launch"), "--help"],
    "slurm-launch train --dry-run": [_bin("slurm-launch"), "train", "--dry-run",
                                     "--tracking-uri", "http://127.0.0.1:5000",
                                     "-P", "lmbda=0.013"],
    "k8s-launch train --dry-run": [_bin("k8s-launch"), "train", "--dry-run",
                                   "-P", "lmbda=0.013"],
}
MODULES = {"taskcodec": "taskcodec.cli.main", "slurm-launch": "taskcodec.cli.slurm",
           "k8s-launch": "taskcodec.cli.k8s"}


def wall(cmd: list[str], env: dict, cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): "
                           f"{done.stderr.strip().splitlines()[-1:]}")
    return elapsed


def top_imports(stderr: str, count: int = 8) -> list[tuple[str, int]]:
    """The modules with the largest cumulative import time in ``-X importtime`` output."""
    found = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line.split(":", 1)[1].split("|", 2)
        found.append((name.strip(), int(cumulative.strip())))
    return sorted(found, key=lambda item: -item[1])[:count]


def profile_import(module: str, env: dict) -> list[tuple[str, int]]:
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                          env=env, capture_output=True, text=True)
    return top_imports(done.stderr)


def bench_launch(ctx: dict, *, runs: int) -> dict:
    work = Path(ctx["work"])
    env = {**os.environ, "TQDM_DISABLE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    times = harness.run_alternating({name: (lambda c=cmd: wall(c, env, work))
                                     for name, cmd in COMMANDS.items()}, runs)
    rows, notes = [], []
    for name, values in times.items():
        s = harness.median_spread(values)
        met = s["median"] < TARGET_S
        rows.append({"command": name, "median s": s["median"], "min s": s["min"],
                     "max s": s["max"], "target < 0.5 s": "met" if met else "MISSED"})
        if not met:
            program = name.split()[0]
            top = profile_import(MODULES[program], env)
            notes.append(f"{name} missed: slowest imports of {MODULES[program]} (cumulative "
                         "us): " + ", ".join(f"{m} {us}" for m, us in top))
    baseline = harness.median_spread(harness.run_alternating(
        {"python": lambda: wall([sys.executable, "-c", "pass"], env, work)}, runs)["python"])
    notes.append(f"bare `python -c pass` takes {baseline['median']:.3f} s here (interpreter "
                 "start-up, part of every figure above).")
    return harness.result(
        "launch_latency", "5. Launch latency (whole process, median of repeated runs)",
        command=ctx["command"], machine_info=ctx["machine"],
        settings={"runs": runs, "target_s": TARGET_S}, rows=rows,
        summary={"python start-up s": baseline["median"]}, notes=notes)
