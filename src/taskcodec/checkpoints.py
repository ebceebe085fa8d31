"""Checkpoints: one dict with fixed keys, written atomically, loaded with ``weights_only``.

Keys: ``model``, ``optimizer``, ``aux_optimizer``, ``lr_scheduler``, ``epoch``, ``step``,
``best``, ``bad_validations``, ``config`` (the run's full settings), ``codec``,
``fingerprint`` (identity of the weights, written into every bitstream), ``run_id``,
``format`` and ``taskcodec_version``. The config travels with the weights, so a checkpoint
alone is enough to rebuild its codec.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from taskcodec.errors import CheckpointError

FORMAT = 1
ARTIFACT_DIR = "checkpoints"
RUN_ID_RE = re.compile(r"^[0-9a-f]{32}$")


def save_atomic(obj: dict[str, Any], path: Path) -> Path:
    """Write to a temp file in the same folder, fsync, then rename: never a half checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot load checkpoint {path}: {first[:200]}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a taskcodec checkpoint (no model/config keys)")
    return ckpt


def resolve(ref: str, which: str = "best", cache: Path | None = None) -> Path:
    """A checkpoint path from a path or an MLflow run id (downloaded from the tracking server)."""
    from taskcodec.tracking import download_artifact

    candidate = Path(ref).expanduser()
    if candidate.is_file():
        return candidate
    if RUN_ID_RE.match(ref):
        dst = (cache or Path(tempfile.mkdtemp(prefix="taskcodec-ckpt-"))) / ref
        try:
            return download_artifact(ref, f"{ARTIFACT_DIR}/{which}.pt", dst)
        except Exception:
            if which == "best":  # a run stopped before its first validation has only last.pt
                return download_artifact(ref, f"{ARTIFACT_DIR}/last.pt", dst)
            raise
    raise CheckpointError(f"checkpoint {ref!r} is neither an existing file nor an MLflow run id "
                          "(32 hex characters)")


def load_ref(ref: str, which: str = "best") -> tuple[dict[str, Any], Path]:
    """Load a checkpoint given as a path or an MLflow run id; a download is removed after
    loading. Returns the checkpoint and where it came from (for messages)."""
    candidate = Path(ref).expanduser()
    if candidate.is_file():
        return load(candidate), candidate
    with tempfile.TemporaryDirectory(prefix="taskcodec-ckpt-") as tmp:
        path = resolve(ref, which, Path(tmp))
        return load(path), Path(f"{ref}/{ARTIFACT_DIR}/{path.name}")
