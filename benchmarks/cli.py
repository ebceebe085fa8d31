"""Benchmark 9: how long one ``taskcodec compress`` takes as a whole process, against what it
cannot avoid: a Python process that imports torch, plus the encode itself.

Side by side, alternating over the repetitions: ``taskcodec compress`` of one Kodak image (a
new process: interpreter, imports, checkpoint, entropy tables, the encode, the file);
``python -c "import torch"`` (a new process); and the encode of the same image with the same
checkpoint in this process (``LoadedCodec.compress``, what evaluate times as encode_time).
Target: the whole ``compress`` within 1.5 x (import torch + encode). Loading the checkpoint in
this process is timed too, to show where the rest goes, and ``python -X importtime`` names the
slowest imports of the command.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import harness
from benchmarks.launch import _bin, top_imports, wall

TARGET = 1.5
COMPRESS = "taskcodec compress (process)"
IMPORT_TORCH = 'python -c "import torch" (process)'
ENCODE = "encode in-process"
LOAD = "load_codec in-process (not in the target)"


def compress_command(program: list[str], image: Path, ckpt: Path, out: Path) -> list[str]:
    """``taskcodec compress IMAGE -o OUT --checkpoint CKPT`` run by ``program`` (the console
    script, or ``[python, -X, importtime, -m, taskcodec.cli.main]``)."""
    return [*program, "compress", str(image), "-o", str(out), "--checkpoint", str(ckpt)]


def target_ratios(values: dict[str, list[float]]) -> list[float]:
    """Per repetition: compress / (import torch + encode), all three from the same repetition."""
    floor = [t + e for t, e in zip(values[IMPORT_TORCH], values[ENCODE], strict=True)]
    return harness.ratios(floor, values[COMPRESS])


def summarize(values: dict[str, list[float]], target: float = TARGET
              ) -> tuple[list[dict], dict]:
    """Rows (median and spread of each side, and of the sum the target is set against) and the
    summary: the median ratio with its spread, and whether it meets the target."""
    sides = dict(values)
    sides["import torch + encode (sum)"] = [t + e for t, e in zip(values[IMPORT_TORCH],
                                                                  values[ENCODE], strict=True)]
    rows = []
    for name, measured in sides.items():
        s = harness.median_spread(measured)
        rows.append({"side": name, "median s": s["median"], "min s": s["min"],
                     "max s": s["max"]})
    ratio = harness.median_spread(target_ratios(values))
    summary = {"compress / (import torch + encode)": ratio, "target": f"<= {target:g}",
               "verdict": "met" if ratio["median"] <= target else "MISSED"}
    return rows, summary


def import_self_seconds(stderr: str, count: int = 8) -> list[tuple[str, float]]:
    """Seconds of ``-X importtime`` output spent in each top-level package's own modules (self
    times summed: torch's share apart from compressai's, scipy's, ...), largest first."""
    totals: dict[str, float] = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, _, name = line.split(":", 1)[1].split("|", 2)
        package = name.strip().split(".")[0]
        totals[package] = totals.get(package, 0.0) + int(self_us.strip()) / 1e6
    return sorted(totals.items(), key=lambda item: -item[1])[:count]


def bench_cli(ctx: dict, ckpt: Path, image: Path, *, reps: int) -> dict:
    import torch
    from PIL import Image

    from taskcodec.codecs.loading import load_codec
    from taskcodec.data.transforms import to_float, to_rgb, to_uint8_tensor

    work = Path(ctx["work"])
    out = work / "cli-bench.tcd"
    # The process sides use as many torch threads as the in-process encode.
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    env.pop("MLFLOW_TRACKING_URI", None)
    with Image.open(image) as img:
        x = to_float(to_uint8_tensor(to_rgb(img)))  # as taskcodec compress reads it
    codec = load_codec(str(ckpt))

    def encode() -> float:
        start = time.perf_counter()
        codec.compress(x)
        return time.perf_counter() - start

    def load() -> float:
        start = time.perf_counter()
        load_codec(str(ckpt))
        return time.perf_counter() - start

    encode()  # warm-up: the timed encodes are repeated ones, as evaluate's after its first
    values = harness.run_alternating({
        COMPRESS: lambda: wall(compress_command([_bin("taskcodec")], image, ckpt, out), env, work),
        IMPORT_TORCH: lambda: wall([sys.executable, "-c", "import torch"], env, work),
        ENCODE: encode, LOAD: load}, reps)
    rows, summary = summarize({k: values[k] for k in (COMPRESS, IMPORT_TORCH, ENCODE)})
    s = harness.median_spread(values[LOAD])
    rows.append({"side": LOAD, "median s": s["median"], "min s": s["min"], "max s": s["max"]})
    profiled = subprocess.run(
        compress_command([sys.executable, "-X", "importtime", "-m", "taskcodec.cli.main"],
                         image, ckpt, out), env=env, cwd=work, capture_output=True, text=True)
    notes = [f"ratio = compress / (import torch + encode) per repetition, the three sides "
             f"alternating (ABC CBA ...) over {reps} repetitions; {image.name} "
             f"({x.shape[-1]}x{x.shape[-2]} px), {env['OMP_NUM_THREADS']} torch thread(s) on "
             "every side.",
             "import time of `taskcodec compress` by package (python -X importtime, self times "
             "summed, s): " + ", ".join(f"{p} {t:.2f}" for p, t in
                                      import_self_seconds(profiled.stderr)),
             "slowest imports (cumulative us): "
             + ", ".join(f"{m} {us}" for m, us in top_imports(profiled.stderr, 4))]
    return harness.result(
        "cli_startup", "9. CLI start-up: `taskcodec compress` vs import torch + encode",
        command=ctx["command"], machine_info=ctx["machine"],
        settings={"reps": reps, "image": str(image), "checkpoint": str(ckpt),
                  "target_ratio": TARGET, "torch_threads": int(env["OMP_NUM_THREADS"])},
        rows=rows, summary=summary, notes=notes)
