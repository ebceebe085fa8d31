"""Multi-process training: DistributedDataParallel over 2 CPU processes (gloo) under torchrun,
the way the launchers run multi-GPU jobs. Real processes, a real process group, real MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

TORCHRUN = Path(sys.executable).parent / "torchrun"


def test_two_gloo_processes_train_one_mlflow_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "taskcodec.cli.main",
           "train", "--N", "8", "--M", "8", "--patch-size", "32", "--batch-size", "2",
           "--max-steps", "4", "--epoch-length", "8", "--max-val-images", "1",
           "--max-side", "128", "--log-every", "1", "--device", "cpu"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    run_ids = done.stdout.split()
    assert len(run_ids) == 1, f"one run id printed (rank 0 only), got {done.stdout!r}"
    run_id = run_ids[0]

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert steps == [1, 2, 3, 4], "each step is logged once, by rank 0 alone"
    # 8 crops per epoch over 2 ranks x batch 2 = 2 steps per epoch: 4 steps make 2 epochs.
    # Training logs the 0-based epoch being trained (validation logs epochs completed).
    epoch_at = {}
    for m in client.get_metric_history(run_id, "epoch"):
        epoch_at[m.step] = min(m.value, epoch_at.get(m.step, m.value))
    assert [epoch_at[s] for s in (1, 2, 3, 4)] == [0.0, 0.0, 1.0, 1.0]

    ckpt = torch.load(tmp_path / "checkpoints" / run_id / "last.pt", weights_only=True)
    assert ckpt["step"] == 4
    assert len([p for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()]) == 1
