"""Checkpoints: one dict with fixed keys, written atomically, loaded with ``weights_only``.

Keys: ``model``, ``optimizer``, ``aux_optimizer``, ``lr_scheduler``, ``epoch``, ``step``,
``best``, ``bad_validations``, ``config`` (the run's full settings), ``codec``,
``fingerprint`` (identity of the weights, written into every bitstream), ``run_id``,
``format`` and ``taskcodec_version``. The config travels with the weights, so a checkpoint
alone is enough to rebuild its codec. A single-layer codec's weights are also under
``state_dict`` (the same tensors, so no bigger file), where CompressAI's ``eval_model
checkpoint`` reads them.

CompressAI checkpoints are read too: ``examples/train.py`` files (weights under ``state_dict``,
``network`` or ``model_state_dict``), plain state dicts, and zoo weights by name
(``compressai:bmshj2018-hyperprior:3``; a variable-rate model has one file for all its rates,
so no quality: ``compressai:mbt2018-vbr``) from the local torch hub cache. Their codec is the
one given (``--codec``) or the one registered codec whose parameters the weights fit.

A reference (:func:`load_ref`) is a path, an MLflow run id, a registered model
(``models:/NAME/VERSION``, ``models:/NAME@ALIAS``: see :mod:`taskcodec.model_registry`) or a
zoo name.
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
#: Where CompressAI's tools keep the weights in a checkpoint file, in the order they look.
COMPRESSAI_KEYS = ("network", "state_dict", "model_state_dict")
ZOO_PREFIX = "compressai:"


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


def load(path: Path, codec: str = "") -> dict[str, Any]:
    """A taskcodec checkpoint, or a CompressAI one converted (``codec``: its architecture,
    needed only where the weights fit more than one)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot load checkpoint {path}: {first[:200]}") from None
    if isinstance(ckpt, dict) and "model" in ckpt and "config" in ckpt:
        return ckpt
    state = _compressai_state(ckpt)
    if state is None:
        raise CheckpointError(f"{path} is neither a taskcodec checkpoint (no model/config keys) "
                              "nor CompressAI weights")
    return from_compressai(state, codec, str(path))


def _compressai_state(obj: Any) -> dict[str, Any] | None:
    """The state dict in a CompressAI-style file, or None."""
    if not isinstance(obj, dict):
        return None
    for key in COMPRESSAI_KEYS:
        if isinstance(obj.get(key), dict):
            return obj[key]
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    return None


def _sizes(state: dict[str, Any], source: str) -> tuple[int, int]:
    """(N, M) of CompressAI weights: the first and the last convolution of ``g_a``."""
    convs = sorted((int(m.group(1)), v) for k, v in state.items()
                   if (m := re.fullmatch(r"g_a\.(\d+)\.weight", k)) and v.dim() == 4)
    if not convs:
        raise CheckpointError(f"{source}: no g_a.<i>.weight convolutions, cannot tell N and M "
                              "of these CompressAI weights")
    return int(convs[0][1].shape[0]), int(convs[-1][1].shape[0])


def _fits(model: torch.nn.Module, state: dict[str, Any]) -> bool:
    """Same keys, and every parameter the same shape (entropy-table buffers are resized)."""
    if set(model.state_dict()) != set(state):
        return False
    return all(tuple(state[k].shape) == tuple(p.shape) for k, p in model.named_parameters())


def from_compressai(state: dict[str, Any], codec: str, source: str) -> dict[str, Any]:
    """A taskcodec checkpoint (codec kind) around CompressAI weights."""
    from compressai.zoo.pretrained import load_pretrained

    from taskcodec.codecs import CODECS, build_codec

    state = load_pretrained(dict(state))  # older CompressAI key names -> today's
    if any(k.startswith("gayn2zqstep.") for k in state):
        raise CheckpointError(f"{source}: variable-rate weights with a variable-rate hyper-latent "
                              "bottleneck (CompressAI's vr_entbttlnck=True, as its published "
                              "bmshj2018-hyperprior-vbr and mbt2018-mean-vbr weights), which "
                              "taskcodec does not code")
    N, M = _sizes(state, source)
    if codec and codec not in CODECS:
        raise CheckpointError(f"unknown codec {codec!r} for {source} "
                              f"(known: {', '.join(sorted(CODECS))})")
    names = [codec] if codec else sorted(CODECS)
    fitting = [name for name in names if _fits(build_codec(name, N=N, M=M), state)]
    if codec and not fitting:
        raise CheckpointError(f"{source}: the weights (N={N}, M={M}) are not a {codec}")
    if len(fitting) != 1:
        found = ", ".join(fitting) or "none"
        raise CheckpointError(f"{source}: CompressAI weights that fit {found} of the registered "
                              "codecs; name it with --codec")
    name = fitting[0]
    return {"format": FORMAT, "codec": name, "entry_point": "train",
            "model_args": {"kind": "codec", "codec": name, "N": N, "M": M},
            "config": {"codec": name, "N": N, "M": M}, "model": state, "source": "compressai"}


def zoo_path(ref: str) -> tuple[str, Path]:
    """(architecture, file in the torch hub cache) of ``compressai:ARCH:QUALITY[:METRIC]``, or
    ``compressai:ARCH[:METRIC]`` for a variable-rate ARCH (one file for all its rates)."""
    from compressai.zoo import image_vbr
    from compressai.zoo.image import cfgs, model_urls

    parts = ref[len(ZOO_PREFIX):].split(":")
    if parts[0] in image_vbr.model_urls:
        return parts[0], _vbr_zoo_path(ref, parts, image_vbr.model_urls[parts[0]])
    arch, quality, metric = (*parts, "mse")[:3] if len(parts) == 2 else (*parts, "", "")[:3]
    try:
        if len(parts) > 3:
            raise ValueError
        url = model_urls[arch][metric][int(quality)]
    except (KeyError, ValueError):
        if arch in cfgs and arch not in model_urls:  # in CompressAI's zoo, never trained there
            raise CheckpointError(f"{ref!r}: CompressAI publishes no weights for {arch} (train "
                                  f"one: taskcodec train --codec {arch})") from None
        raise CheckpointError(f"{ref!r}: not a CompressAI zoo model (write "
                              "compressai:ARCH:QUALITY[:METRIC], e.g. "
                              "compressai:bmshj2018-hyperprior:3)") from None
    return arch, _hub_file(url)


def _hub_file(url: str) -> Path:
    """Where torch hub keeps the weights of ``url`` (the file is never downloaded here)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _vbr_zoo_path(ref: str, parts: list[str], urls: dict[str, str]) -> Path:
    if len(parts) > 2 or (len(parts) == 2 and parts[1].isdigit()):
        raise CheckpointError(f"{ref!r}: {parts[0]} has one weight file for all its rates: no "
                              f"quality (write {ZOO_PREFIX}{parts[0]}, and choose the rate point "
                              "with --rate)")
    metric = parts[1] if len(parts) == 2 else "mse"
    if metric not in urls:
        raise CheckpointError(f"{ref!r}: CompressAI publishes {parts[0]} for "
                              f"{', '.join(urls)} only, not {metric!r}")
    return _hub_file(urls[metric])


def load_zoo(ref: str) -> dict[str, Any]:
    """Zoo weights from the local torch hub cache (never downloaded)."""
    arch, path = zoo_path(ref)
    if not path.is_file():
        raise CheckpointError(f"{ref}: its weights are not in the local torch hub cache "
                              f"(expected {path}; taskcodec does not download them)")
    return load(path, arch)


#: What only resuming needs: left out of the copy an MLflow model holds.
TRAINING_STATE = ("optimizer", "aux_optimizer", "lr_scheduler", "unsent_metrics", "epoch_step",
                  "bad_validations", "seconds")


def without_training_state(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint minus the optimizers and loop state: still a taskcodec checkpoint (same
    weights, fingerprint, config and ``model_args``), about a third of the size."""
    return {k: v for k, v in ckpt.items() if k not in TRAINING_STATE}


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
    raise CheckpointError(f"checkpoint {ref!r} is neither an existing file nor an MLflow run "
                          "id (32 hex characters) nor a registered model (models:/NAME/VERSION or "
                          "models:/NAME@ALIAS)")


def load_ref(ref: str, which: str = "best", codec: str = "") -> tuple[dict[str, Any], Path]:
    """Load a checkpoint given as a path, an MLflow run id, a registered model
    (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``) or a CompressAI zoo name; a download
    is removed after loading. Returns the checkpoint and where it came from (for messages).
    ``codec`` names the architecture of CompressAI weights where their keys do not tell."""
    from taskcodec import model_registry

    candidate = Path(ref).expanduser()
    if candidate.is_file():
        return load(candidate, codec), candidate
    if ref.startswith(ZOO_PREFIX):
        return load_zoo(ref), zoo_path(ref)[1]
    if model_registry.is_model_uri(ref):
        if which != "best":
            raise CheckpointError(f"{ref}: a registered model holds one checkpoint; "
                                  f"--which {which} is for run ids")
        with tempfile.TemporaryDirectory(prefix="taskcodec-ckpt-") as tmp:
            path, found = model_registry.download_checkpoint(ref, Path(tmp))
            return load(path), Path(str(found))
    with tempfile.TemporaryDirectory(prefix="taskcodec-ckpt-") as tmp:
        path = resolve(ref, which, Path(tmp))
        return load(path), Path(f"{ref}/{ARTIFACT_DIR}/{path.name}")
