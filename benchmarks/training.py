"""Benchmarks 1, 4 and 6: training throughput, same math, scaling.

The taskcodec side is the real engine (``Trainer(config).run()``: MLflow run, background
logging, validation, checkpoints); a recipe subclass only notes the time each step starts, so
images/s counts whole steps (data, forward, backward, both optimizers, logging) after warm-up,
exactly as the plain loop is timed. Validation and checkpoints come after the last timed step
(one epoch longer than the step budget), and are reported apart as whole-call wall time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.plain_loop import images_per_second, train_plain, validate_plain

ROOT = Path(__file__).resolve().parent.parent
#: Crop side and embedded-image size: small, so the whole `make bench` fits 20 min on 2 cores.
PATCH = 64
MAX_SIDE = 256


def cpu_snapshot(server_pgid: int | None) -> dict[str, float]:
    """CPU seconds used so far by the MLflow server's processes and by taskcodec's logger
    thread (the two things the plain loop does not have), with the wall clock."""
    logger = next((t for t in threading.enumerate() if t.name == "mlflow-logger"), None)
    return {"wall": time.perf_counter(),
            "server": harness.group_cpu_seconds(server_pgid) if server_pgid else 0.0,
            "logger": harness.thread_cpu_seconds(logger.native_id) if logger else 0.0}


def _timed_recipe(config, marks=(), server_pgid=None):
    from taskcodec.recipes import CodecRecipe

    class TimedRecipe(CodecRecipe):
        """CodecRecipe that notes when each training step starts (nothing else changes) and,
        just before the steps in ``marks`` start, how much CPU the server and logger used."""

        def __init__(self, cfg):
            super().__init__(cfg)
            self.step_times: list[float] = []
            self.cpu: list[dict[str, float]] = []

        def losses(self, model, batch, device):
            if len(self.step_times) in marks:
                self.cpu.append(cpu_snapshot(server_pgid))
            self.step_times.append(time.perf_counter())
            return super().losses(model, batch, device)

    return TimedRecipe(config)


def cpu_share(cpu: list[dict[str, float]]) -> dict[str, float]:
    """CPU used by the server and the logger thread between two snapshots, as a share of one
    core over that wall time."""
    first, last = cpu[0], cpu[-1]
    wall = last["wall"] - first["wall"]
    return {k: (last[k] - first[k]) / wall for k in ("server", "logger")}


def train_config(codec: str, *, N: int, M: int, batch_size: int, steps: int, seed: int,
                 checkpoint_dir: Path, patch_size: int = PATCH):
    from taskcodec.config import TrainConfig

    return TrainConfig(codec=codec, N=N, M=M, data="embedded", patch_size=patch_size,
                       batch_size=batch_size, epochs=1, epoch_length=batch_size * (steps + 8),
                       max_steps=steps, lr_scheduler="none", seed=seed, device="cpu",
                       max_side=MAX_SIDE, checkpoint_dir=str(checkpoint_dir),
                       # like for like with the plain loop (benchmark 7 measures the switches)
                       compile="false", channels_last=False, precision="fp32")


def run_taskcodec(config, uri: str, *, marks=(), server_pgid: int | None = None) -> dict:
    """One in-process taskcodec training run logging to ``uri``; CPU snapshots before the
    steps in ``marks``."""
    from taskcodec.engine import Trainer

    os.environ["MLFLOW_TRACKING_URI"] = uri
    recipe = _timed_recipe(config, marks, server_pgid)
    start = time.perf_counter()
    trainer = Trainer(config, recipe=recipe)
    trainer.run()
    wall = time.perf_counter() - start
    return {"step_times": recipe.step_times, "wall": wall, "cpu": recipe.cpu,
            "val_loss": trainer.state.history[-1]["val_loss"]}


def datasets(seed: int, batch_size: int, steps: int, patch_size: int = PATCH):
    from taskcodec.data import build_dataset

    train = build_dataset("embedded", "train", patch_size=patch_size, seed=seed,
                          max_side=MAX_SIDE, epoch_length=batch_size * (steps + 8))
    val = build_dataset("embedded", "val", seed=seed, max_side=MAX_SIDE)
    return train, [val[i] for i in range(len(val))]


def start_server(folder: Path) -> str:
    out = subprocess.run([str(ROOT / "scripts" / "mlflow-server"), "start", "--dir", str(folder)],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def stop_server(folder: Path) -> None:
    subprocess.run([str(ROOT / "scripts" / "mlflow-server"), "stop", "--dir", str(folder)],
                   check=False, capture_output=True)


def bench_throughput(ctx: dict, *, codecs, N: int, M: int, batch_size: int, warmup: int,
                     measured: int, reps: int, seed: int = 0) -> tuple[dict, dict]:
    """Benchmark 1 (plain vs taskcodec to sqlite and to a server) and 4 (same val loss)."""
    work = Path(ctx["work"])
    steps = warmup + measured + 1
    rows, same_math, summary = [], [], {}
    server_dir = work / "server"
    server_dir.mkdir(parents=True, exist_ok=True)
    server_uri = start_server(server_dir)
    server_pgid = int((server_dir / "server.pid").read_text())
    try:
        for codec in codecs:
            ips, walls, vals, cpu = _measure_codec(
                codec, N=N, M=M, batch_size=batch_size, warmup=warmup, measured=measured,
                reps=reps, seed=seed, work=work, server_pgid=server_pgid,
                uris={"taskcodec-sqlite": f"sqlite:///{work / 'mlflow.db'}",
                      "taskcodec-server": server_uri})
            for name in ("taskcodec-sqlite", "taskcodec-server"):
                r = harness.median_spread(harness.ratios(ips["plain"], ips[name]))
                rows.append({"codec": codec, "side": name,
                             "plain img/s": harness.median_spread(ips["plain"])["median"],
                             "taskcodec img/s": harness.median_spread(ips[name])["median"],
                             "ratio median": r["median"], "ratio min": r["min"],
                             "ratio max": r["max"],
                             "wall s (plain / taskcodec)":
                                 f"{statistics_median(walls['plain']):.1f} / "
                                 f"{statistics_median(walls[name]):.1f}",
                             "server CPU % of a core": _pct(cpu[name], "server"),
                             "logger thread CPU % of a core": _pct(cpu[name], "logger"),
                             "target >= 1.0 (0.98)": "met" if r["median"] >= 0.98 else "MISSED"})
                summary[f"{codec} {name} ratio"] = r
            p, t = vals["plain"][0], vals["taskcodec-sqlite"][0]
            same_math.append({"codec": codec, "steps": steps, "plain val_loss": p,
                              "taskcodec val_loss": t, "relative difference": abs(t - p) / abs(p),
                              "each side identical across reps":
                                  len(set(vals["plain"])) == 1
                                  and len(set(vals["taskcodec-sqlite"])) == 1})
    finally:
        stop_server(server_dir)
    settings = {"N": N, "M": M, "batch_size": batch_size, "patch_size": PATCH,
                "max_side": MAX_SIDE,
                "warmup_steps": warmup, "measured_steps": measured, "repetitions": reps,
                "seed": seed,
                "data": f"embedded (scikit-image, longer side {MAX_SIDE}), random {PATCH} px crops",
                "lr": 1e-4, "aux_lr": 1e-3, "lmbda": 0.013, "clip_max_norm": 1.0}
    throughput = harness.result(
        "train_throughput", "1. Training throughput: plain CompressAI loop vs taskcodec",
        command=ctx["command"], machine_info=ctx["machine"], settings=settings, rows=rows,
        summary=summary, notes=[
            "images/s over the measured steps only (after warm-up), each step from its start "
            "to the next step's start: data, forward, backward, clip, both optimizers and, for "
            "taskcodec, its loss logging every 10 steps (log_every=10, background thread).",
            "taskcodec's whole call also creates the MLflow run, logs params/tags, validates "
            "once on the 2 embedded val images and writes + uploads last/best checkpoints; "
            "that is in the wall column (plain wall includes its validation), not in img/s.",
            "ratio = taskcodec img/s / plain img/s per repetition (sides alternate ABC CBA); "
            "target >= 1.0x with < 2 % logging overhead, judged as median ratio >= 0.98.",
            "server CPU / logger thread CPU: what the MLflow server's processes and taskcodec's "
            "logging thread used during the measured steps, as a share of one core (/proc).",
            "profiled (py-spy 0.4.3: `py-spy record --threads --format raw -- python ...`, 400 "
            "steps each side): taskcodec's extra time sat inside the model's forward/backward, "
            "not in its own code: the logging thread's Python work (SQLAlchemy or the HTTP "
            "client) takes the GIL from the training thread between torch ops. With a log_batch "
            "every 10 steps (~0.7 s here) that cost ~2 % (A/B in one process: 0.977x plain "
            "with logging, 0.996x with logging off); the logger now sends metrics at most every "
            "2 s, in one batch (RunLogger.metrics_interval): 1.016x in the same A/B.",
            "the 0.58-0.73x to a server in an earlier run was measured at load average 5-9: "
            "the server's workers then took CPU the training thread needed; on an idle machine "
            "the server uses the share of a core shown above.",
            f"small on purpose: N={N}/M={M}, {PATCH} px crops, {measured} measured steps after "
            f"{warmup}, {reps} repetitions; the spread is the noise of a 2-core VM."])
    math_result = harness.result(
        "same_math", "4. Same math: validation loss after the same steps, same seed",
        command=ctx["command"], machine_info=ctx["machine"],
        settings={**settings, "validation": "the 2 embedded val images, whole, zero-padded "
                                                 "to a multiple of 64"},
        rows=same_math,
        summary={r["codec"]: r["relative difference"] for r in same_math},
        notes=["plain = the hand loop + its own validation; taskcodec = Trainer's val_loss "
               "of the run measured in benchmark 1 (to sqlite)."])
    return throughput, math_result


def _pct(shares: list[dict[str, float]], key: str) -> float:
    return round(100 * harness.median_spread([s[key] for s in shares])["median"], 1)


def _measure_codec(codec: str, *, N: int, M: int, batch_size: int, warmup: int, measured: int,
                   reps: int, seed: int, work: Path, uris: dict[str, str],
                   server_pgid: int | None = None):
    """img/s, whole-call wall times, val losses and the measured steps' server/logger CPU
    shares of the plain loop and each taskcodec side."""
    steps = warmup + measured + 1
    train_set, val_images = datasets(seed, batch_size, steps)
    walls: dict[str, list[float]] = {"plain": [], **{name: [] for name in uris}}
    vals: dict[str, list[float]] = {"plain": [], **{name: [] for name in uris}}
    cpu: dict[str, list[dict[str, float]]] = {name: [] for name in uris}

    def plain():
        start = time.perf_counter()
        res = train_plain(codec, N, M, train_set, batch_size=batch_size, steps=steps, seed=seed)
        vals["plain"].append(validate_plain(res.model, val_images))
        walls["plain"].append(time.perf_counter() - start)
        return images_per_second(res.step_times, warmup, measured, batch_size)

    def taskcodec(name: str):
        def side():
            cfg = train_config(codec, N=N, M=M, batch_size=batch_size, steps=steps, seed=seed,
                               checkpoint_dir=Path(tempfile.mkdtemp(dir=work)))
            res = run_taskcodec(cfg, uris[name], marks=(warmup, warmup + measured),
                                server_pgid=server_pgid if "server" in name else None)
            walls[name].append(res["wall"])
            vals[name].append(res["val_loss"])
            cpu[name].append(cpu_share(res["cpu"]))
            return images_per_second(res["step_times"], warmup, measured, batch_size)
        return side

    ips = harness.run_alternating({"plain": plain, **{name: taskcodec(name) for name in uris}},
                                  reps)
    return ips, walls, vals, cpu


def statistics_median(values):
    return harness.median_spread(values)["median"] if values else float("nan")


def bench_variants(ctx: dict, *, N: int, M: int, batch_size: int, warmup: int, measured: int,
                   reps: int, seed: int = 0, compile_model: bool = True) -> dict:
    """Benchmark 1b: do channels_last or the thread count speed up the plain step here?"""
    steps = warmup + measured + 1
    train_set, _ = datasets(seed, batch_size, steps)
    default_threads = torch.get_num_threads()

    compile_s: list[float] = []

    def plain(channels_last=False, threads=1, compile=False):
        def side():
            torch.set_num_threads(threads)
            try:
                res = train_plain("bmshj2018-factorized", N, M, train_set, batch_size=batch_size,
                                  steps=steps, seed=seed, channels_last=channels_last,
                                  compile=compile)
            finally:
                torch.set_num_threads(default_threads)
            if compile:  # the first step traces and compiles forward and backward
                compile_s.append(res.step_times[1] - res.step_times[0])
            return images_per_second(res.step_times, warmup, measured, batch_size)
        return side

    sides = {"1 thread (bench default)": plain(), "channels_last, 1 thread":
             plain(channels_last=True), "2 threads (torch default here)": plain(threads=2)}
    if compile_model:
        sides["torch.compile (inductor), 1 thread"] = plain(compile=True)
    ips = harness.run_alternating(sides, reps)
    rows = []
    for name in sides:
        r = harness.median_spread(harness.ratios(ips["1 thread (bench default)"], ips[name]))
        rows.append({"variant": name, "img/s median": harness.median_spread(ips[name])["median"],
                     "vs 1 thread median": r["median"], "min": r["min"], "max": r["max"]})
    speed = {r["variant"]: r["vs 1 thread median"] for r in rows}
    load = os.getloadavg()[0]
    notes = [f"2 intra-op threads (torch's default here, = cores) ran at "
             f"{speed['2 threads (torch default here)']:.2f}x the 1-thread speed (load average "
             f"{load:.1f} at the end of this benchmark). On a CPU shared with other work the two "
             "threads wait on each other (0.16x at load 6 in an earlier run), so every other "
             "training benchmark runs with torch.set_num_threads(1) to keep the ratios readable.",
             f"channels_last: {speed['channels_last, 1 thread']:.2f}x."]
    if compile_s:
        notes.append(
            f"torch.compile(model) (inductor, CPU, forward compiled, loss and optimizers eager): "
            f"{speed['torch.compile (inductor), 1 thread']:.2f}x the eager step once compiled; "
            f"the first step (tracing + compiling forward and backward) took "
            f"{compile_s[0]:.1f} s with a cold inductor cache and "
            f"{harness.median_spread(compile_s[1:] or compile_s)['median']:.1f} s with it warm "
            "(same process); a new process pays the trace again, so it pays off for runs of "
            "thousands of steps, not for this benchmark's.")
    notes.append("data loading is not the bottleneck here (crops of in-memory images, "
                 "num_workers=0); worker processes would compete for the same 2 cores.")
    return harness.result(
        "train_variants", "1b. Step speed-ups tried on the plain loop (factorized)",
        command=ctx["command"], machine_info=ctx["machine"],
        settings={"N": N, "M": M, "batch_size": batch_size, "measured_steps": measured,
                  "repetitions": reps, "default_threads": default_threads,
                  "compile_first_step_s": compile_s},
        rows=rows, summary=speed, notes=notes)


def bench_scaling(ctx: dict, *, N: int, M: int, batches, warmup: int, measured: int,
                  reps: int, ddp_batch: int, ddp_reps: int = 1, seed: int = 0) -> dict:
    """Benchmark 6: img/s vs batch size (in process), and 1 vs 2 DDP processes (torchrun)."""
    work = Path(ctx["work"])
    uri = f"sqlite:///{work / 'mlflow.db'}"
    steps = warmup + measured + 1

    def at(batch):
        def side():
            cfg = train_config("bmshj2018-factorized", N=N, M=M, batch_size=batch, steps=steps,
                               seed=seed, checkpoint_dir=Path(tempfile.mkdtemp(dir=work)))
            res = run_taskcodec(cfg, uri)
            return images_per_second(res["step_times"], warmup, measured, batch)
        return side

    ips = harness.run_alternating({f"batch {b}": at(b) for b in batches}, reps)
    rows = [{"setting": name, "processes": 1, "img/s median": harness.median_spread(v)["median"],
             "min": min(v), "max": max(v)} for name, v in ips.items()]
    ddp = ddp_scaling(ctx, N=N, M=M, total_batch=ddp_batch, warmup=warmup, measured=measured,
                      reps=ddp_reps, seed=seed)
    rows += ddp["rows"]
    return harness.result(
        "scaling", "6. Scaling: batch size, and 1 vs 2 DDP CPU processes",
        command=ctx["command"], machine_info=ctx["machine"],
        settings={"N": N, "M": M, "batches": list(batches), "measured_steps": measured,
                  "repetitions": reps, "ddp_total_batch": ddp_batch,
                  "ddp_repetitions": ddp_reps},
        rows=rows, summary=ddp["summary"], notes=[
            "batch rows: taskcodec in-process (factorized), img/s over measured steps.",
            "DDP rows: whole `taskcodec train` processes (torchrun --standalone, gloo, "
            "OMP_NUM_THREADS=1 per process on both sides) with log_every=1; img/s from the "
            "MLflow timestamps of the loss of the measured steps, so start-up, run creation, "
            "validation and checkpoints are left out. Same total batch: 1 process x B vs 2 "
            f"processes x B/2; {ddp_reps} repetition(s): each process start costs 20-30 s here.",
            "in-process rows use torch.set_num_threads(1) like every training benchmark here "
            "(see 1b)."])


def _train_cmd(nproc: int, batch: int, steps: int, work: Path, N: int, M: int, seed: int):
    args = ["train", "--codec", "bmshj2018-factorized", "--N", str(N), "--M", str(M),
            "--patch-size", str(PATCH), "--max-side", str(MAX_SIDE), "--batch-size", str(batch),
            "--epochs", "1", "--epoch-length", str(batch * nproc * (steps + 8)),
            "--max-steps", str(steps), "--log-every", "1", "--lr-scheduler", "none",
            "--seed", str(seed), "--device", "cpu", "--checkpoint-dir", tempfile.mkdtemp(dir=work)]
    if nproc == 1:
        return [sys.executable, "-m", "taskcodec.cli.main", *args]
    torchrun = Path(sys.executable).with_name("torchrun")
    return [str(torchrun), "--standalone", "--nproc-per-node", str(nproc),
            "-m", "taskcodec.cli.main", *args]


def ddp_scaling(ctx: dict, *, N: int, M: int, total_batch: int, warmup: int, measured: int,
                reps: int, seed: int) -> dict:
    """img/s from the MLflow timestamps of the per-step loss (log_every=1), so process start-up
    (20-30 s here, and noisy) does not enter the figure."""
    from mlflow.tracking import MlflowClient

    work = Path(ctx["work"])
    uri = f"sqlite:///{work / 'mlflow-ddp.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "src")}
    steps = warmup + measured + 1

    def rate(nproc: int):
        def side():
            cmd = _train_cmd(nproc, total_batch // nproc, steps, work, N, M, seed)
            done = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True,
                                  cwd=work)
            run_id = done.stdout.strip().splitlines()[-1]
            history = sorted(MlflowClient(uri).get_metric_history(run_id, "loss"),
                             key=lambda m: m.step)
            stamps = [m.timestamp / 1000 for m in history]
            return measured * total_batch / (stamps[warmup + measured] - stamps[warmup])
        return side

    ips = harness.run_alternating({"1 process": rate(1), "2 processes (DDP)": rate(2)}, reps)
    r = harness.median_spread(harness.ratios(ips["1 process"], ips["2 processes (DDP)"]))
    rows = [{"setting": f"{name}, total batch {total_batch}", "processes": 1 if "1" in name else 2,
             "img/s median": harness.median_spread(v)["median"], "min": min(v), "max": max(v)}
            for name, v in ips.items()]
    return {"rows": rows, "summary": {"DDP 2 vs 1 process": r}}
