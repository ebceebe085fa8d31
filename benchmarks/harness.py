"""The pure parts of the benchmarks: statistics, alternation, machine facts, results files.

Every comparison is measured side by side in one process: A and B alternate (ABBA...), each
repetition gives one ratio B/A, and we report the median ratio with its min-max spread, so a
burst of load from other work on a shared machine shows up as spread instead of a bias.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS_SCHEMA = 1
RESULT_KEYS = ("schema", "benchmark", "title", "command", "machine", "settings", "rows",
               "summary", "notes")


def median_spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and interquartile range of repeated measurements."""
    if not values:
        raise ValueError("median_spread needs at least one value, got none")
    data = sorted(float(v) for v in values)
    if len(data) >= 2:
        q1, _, q3 = statistics.quantiles(data, n=4, method="inclusive")
    else:
        q1 = q3 = data[0]
    return {"median": statistics.median(data), "min": data[0], "max": data[-1],
            "q1": q1, "q3": q3, "n": len(data)}


def ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per-repetition ratios b/a of paired measurements (same repetition, same load)."""
    if len(a) != len(b):
        raise ValueError(f"paired measurements differ in length: {len(a)} vs {len(b)}")
    if any(v == 0 for v in a):
        raise ValueError("cannot take a ratio over a zero measurement")
    return [float(y) / float(x) for x, y in zip(a, b)]


def alternating(names: Sequence[str], repetitions: int) -> list[tuple[int, str]]:
    """The run order: forwards on even repetitions, backwards on odd ones (ABC CBA ABC ...),
    so no side always runs first (warm caches) or last (a slowly rising load)."""
    if repetitions < 1:
        raise ValueError(f"repetitions={repetitions} must be >= 1")
    order = []
    for rep in range(repetitions):
        sides = list(names) if rep % 2 == 0 else list(reversed(names))
        order += [(rep, name) for name in sides]
    return order


def run_alternating(sides: dict[str, Callable[[], float]], repetitions: int
                    ) -> dict[str, list[float]]:
    """Call each side's measurement in alternating order; values per side, in rep order."""
    values: dict[str, list[float]] = {name: [0.0] * repetitions for name in sides}
    for rep, name in alternating(list(sides), repetitions):
        values[name][rep] = float(sides[name]())
    return values


def fmt_spread(s: dict[str, float], digits: int = 3) -> str:
    """'1.02 (0.98-1.05)': median and min-max."""
    return f"{s['median']:.{digits}g} ({s['min']:.{digits}g}-{s['max']:.{digits}g})"


def cpu_model(cpuinfo: str) -> str:
    """The CPU model line of /proc/cpuinfo's text (x86 'model name' or ARM 'Model')."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "cpu model") and value.strip():
            return value.strip()
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """What the figures depend on: cores, CPU, torch and Python versions, and the load."""
    import torch

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    return {"nproc": os.cpu_count(), "cpu_model": cpu_model(cpuinfo),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def result(benchmark: str, title: str, *, command: str, machine_info: dict[str, Any],
           settings: dict[str, Any], rows: list[dict[str, Any]], summary: dict[str, Any],
           notes: Sequence[str] = ()) -> dict[str, Any]:
    """One benchmark's results in the shape of benchmarks/results/*.json."""
    if not benchmark.replace("_", "").isalnum():
        raise ValueError(f"benchmark name {benchmark!r} must be letters, digits and _")
    return {"schema": RESULTS_SCHEMA, "benchmark": benchmark, "title": title,
            "command": command, "machine": machine_info, "settings": settings,
            "rows": rows, "summary": summary, "notes": list(notes)}


def check_result(obj: dict[str, Any]) -> None:
    """Refuse a results object without the agreed keys (what BENCHMARKS.md is built from)."""
    missing = [k for k in RESULT_KEYS if k not in obj]
    if missing:
        raise ValueError(f"results object lacks keys: {', '.join(missing)}")
    if not isinstance(obj["rows"], list) or not isinstance(obj["summary"], dict):
        raise ValueError("results object: rows must be a list and summary a dict")


def write_result(obj: dict[str, Any], folder: Path) -> Path:
    check_result(obj)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{obj['benchmark']}.json"
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    return path


def table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of rows (dicts); floats get 4 significant digits."""
    if not rows:
        return "(no rows)\n"
    columns = list(columns or rows[0].keys())

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def markdown(results: list[dict[str, Any]], header: str) -> str:
    """BENCHMARKS.md: the header text, the machine and command, then one section per result."""
    if not results:
        raise ValueError("no benchmark results to write")
    m = results[0]["machine"]
    out = [header.rstrip() + "\n",
           "## Last run\n",
           f"- Command: `{results[0]['command']}`",
           f"- Machine: {m['nproc']} cores (`nproc`), {m['cpu_model']}; torch {m['torch']} "
           f"({m['torch_threads']} threads), Python {m['python']}; load average at start "
           f"{m.get('loadavg_at_start')}",
           ""]
    for r in results:
        out.append(f"### {r['title']}\n")
        out.append(table(r["rows"]))
        if r["summary"]:
            out.append("Summary: " + "; ".join(f"{k} = {_short(v)}"
                                               for k, v in r["summary"].items()) + "\n")
        for note in r["notes"]:
            out.append(f"- {note}")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict) and "median" in v:
        return fmt_spread(v)
    return str(v)


def _proc_cpu_seconds(stat_path: Path) -> float:
    """utime + stime of one /proc/<pid>/stat or /proc/<pid>/task/<tid>/stat, in seconds."""
    try:
        text = stat_path.read_text()
    except OSError:
        return 0.0  # gone meanwhile
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds used so far by the live processes of process group ``pgid`` (Linux /proc)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    total += _proc_cpu_seconds(entry / "stat")
            except (ProcessLookupError, PermissionError):
                continue
    return total


def thread_cpu_seconds(native_id: int) -> float:
    """CPU seconds used so far by one thread of this process."""
    return _proc_cpu_seconds(Path(f"/proc/self/task/{native_id}/stat"))
