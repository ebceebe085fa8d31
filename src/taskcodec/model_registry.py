"""Trained codecs as MLflow models, registered under a name and found again by it.

* A finished training run logs its codec as an MLflow model (MLflow 3 "logged model"), a
  ``python_function`` model whose loader is this module and whose one data file,
  ``data/model.pt``, is the run's checkpoint without its training state: the weights, the
  ``model_args`` and config that rebuild the codec, and the fingerprint every bitstream
  carries. The full checkpoint (optimizers, schedule: about three times the weights) stays
  with the run, for resuming; the model adds the weights once, not a second full checkpoint.
* ``--register-as NAME`` (training) or ``taskcodec register RUN_ID NAME`` makes that model a
  version of the registered model NAME in the Model Registry, ``--alias`` points an alias
  (``champion``) at it.
* ``models:/NAME/VERSION`` and ``models:/NAME@ALIAS`` are accepted wherever a run id is (see
  :func:`taskcodec.checkpoints.load_ref`); an unknown name, version or alias is one
  :class:`CheckpointError` line naming it and what exists.
* ``mlflow.pyfunc.load_model("models:/NAME@ALIAS").predict(images)`` compresses uint8
  ``H x W x 3`` images into taskcodec files (bytes), decodable by ``taskcodec decompress``
  with the same model.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskcodec.errors import CheckpointError, ConfigError, TrackingError

log = logging.getLogger(__name__)

MODELS_PREFIX = "models:/"
#: The checkpoint's name inside the logged model (under ``data/``).
DATA_FILE = "model.pt"
#: Run tags naming the model a run logged, and the weights it holds (so it is logged once).
MODEL_ID_TAG = "logged_model_id"
MODEL_FINGERPRINT_TAG = "logged_model_fingerprint"
#: Names MLflow stores and taskcodec can parse back out of ``models:/NAME@ALIAS``.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")
_ALIAS_RE = re.compile(r"^[A-Za-z0-9_-]{1,255}$")


def is_model_uri(ref: str) -> bool:
    return ref.startswith(MODELS_PREFIX)


def check_name(name: str, what: str = "register_as") -> tuple[str, str]:
    """``NAME`` or ``NAME@ALIAS`` -> (name, alias); a :class:`ConfigError` for anything else."""
    name, _, alias = name.partition("@")
    if not _NAME_RE.match(name):
        raise ConfigError(f"{what}={name!r} is not a model name (letters, digits, '_', '-', "
                          "'.'; starting with a letter or digit)")
    if alias:
        check_alias(alias, what)
    return name, alias


def check_alias(alias: str, what: str = "alias") -> str:
    # MLflow keeps "latest" and "v<N>" for itself.
    if not _ALIAS_RE.match(alias) or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise ConfigError(f"{what}: {alias!r} is not a usable alias (letters, digits, '_', '-'; "
                          "not 'latest' or v<N>)")
    return alias


@dataclass(frozen=True)
class ModelVersionRef:
    """One registered model version, as a ``models:/`` reference resolved to it."""

    name: str
    version: str
    run_id: str     # the training run that logged it
    model_id: str   # the MLflow logged model ("" for a version made from a run artifact)
    source: str

    def __str__(self) -> str:
        return f"{MODELS_PREFIX}{self.name}/{self.version}"


def parse(ref: str) -> tuple[str, str, str]:
    """``models:/NAME/VERSION`` -> (NAME, VERSION, ""); ``models:/NAME@ALIAS`` -> (NAME, "",
    ALIAS)."""
    body = ref[len(MODELS_PREFIX):]
    if "@" in body:
        name, _, alias = body.partition("@")
        version = ""
    else:
        name, _, version = body.rpartition("/")
        alias = ""
    if not _NAME_RE.match(name) or not (alias or version.isdigit()):
        raise CheckpointError(f"{ref!r} is not a registered model reference (write "
                              "models:/NAME/VERSION or models:/NAME@ALIAS)")
    return name, version, alias


def _client(uri: str | None = None):
    from mlflow.tracking import MlflowClient

    from taskcodec.tracking import tracking_uri

    return MlflowClient(tracking_uri=uri or tracking_uri(), registry_uri=uri or tracking_uri())


def _missing(err: Exception) -> bool:
    return getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]


def _listing(items: Sequence[str], empty: str) -> str:
    return ", ".join(items[:10]) + (" ..." if len(items) > 10 else "") if items else empty


def resolve(ref: str, uri: str | None = None) -> ModelVersionRef:
    """The registered version a ``models:/`` reference names, or one line naming what is not
    there (the model, the version or the alias) and what is."""
    name, version, alias = parse(ref)
    client = _client(uri)
    try:
        registered = client.get_registered_model(name)
    except Exception as err:
        if not _missing(err):
            raise TrackingError(f"{ref}: the Model Registry at {client.tracking_uri} did not "
                                f"answer: {_first_line(err)}") from None
        known = sorted(m.name for m in client.search_registered_models(max_results=20))
        raise CheckpointError(f"{ref}: no registered model {name!r} at {client.tracking_uri} "
                              f"(registered: {_listing(known, 'none')})") from None
    if alias:
        aliases = dict(registered.aliases or {})
        if alias not in aliases:
            named = [f"{a} -> {v}" for a, v in sorted(aliases.items())]
            raise CheckpointError(f"{ref}: model {name!r} has no alias {alias!r} (aliases: "
                                  f"{_listing(named, 'none')}; set one with taskcodec register "
                                  f"RUN_ID {name} --alias {alias})")
        version = str(aliases[alias])
    try:
        found = client.get_model_version(name, version)
    except Exception as err:
        if not _missing(err):
            raise TrackingError(f"{ref}: the Model Registry at {client.tracking_uri} did not "
                                f"answer: {_first_line(err)}") from None
        versions = sorted(int(v.version) for v in
                          client.search_model_versions(f"name = '{name}'", max_results=1000))
        raise CheckpointError(f"{ref}: model {name!r} has no version {version} (versions: "
                              f"{_listing([str(v) for v in versions], 'none')})") from None
    source = found.source or ""
    # A server's answer may lack model_id; a logged model's version has models:/MODEL_ID as source.
    logged = source.removeprefix(MODELS_PREFIX) if source.startswith(MODELS_PREFIX) else ""
    return ModelVersionRef(name=name, version=str(found.version), run_id=found.run_id or "",
                           model_id=getattr(found, "model_id", None) or logged.split("/")[0],
                           source=source)


def holding(ref: str, fingerprint: str, uri: str | None = None) -> ModelVersionRef | None:
    """The version ``ref`` names now if it holds the weights with ``fingerprint`` (as its
    training run's tag says), else None: ``models:/NAME@ALIAS`` may have moved on since a
    checkpoint took its weights from it."""
    model = resolve(ref, uri)
    if not fingerprint or not model.run_id:
        return model
    try:
        logged = _client(uri).get_run(model.run_id).data.tags.get(MODEL_FINGERPRINT_TAG, "")
    except Exception as err:
        raise TrackingError(f"{ref}: cannot read its run {model.run_id}: "
                            f"{_first_line(err)}") from None
    return model if logged in ("", fingerprint) else None


def download_checkpoint(ref: str, dst: Path, uri: str | None = None) -> tuple[Path,
                                                                              ModelVersionRef]:
    """The checkpoint file of the model version ``ref`` names, downloaded into ``dst``."""
    import mlflow.artifacts

    found = resolve(ref, uri)
    client = _client(uri)
    # A logged model's own artifact folder; an older version's source (a run's artifacts).
    location = (client.get_logged_model(found.model_id).artifact_location if found.model_id
                else client.get_model_version_download_uri(found.name, found.version))
    try:
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{location.rstrip('/')}/data/{DATA_FILE}", dst_path=str(dst),
            tracking_uri=client.tracking_uri)
    except Exception as err:
        raise CheckpointError(f"{ref} ({found}) holds no taskcodec checkpoint data/{DATA_FILE} "
                              f"(its source is {found.source}): {_first_line(err)}") from None
    return Path(path), found


# -- logging and registering ---------------------------------------------------------------
def _requirements() -> list[str]:
    """What the model needs installed (exact versions of this environment)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("taskcodec", "torch", "compressai", "mlflow"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            reqs.append(dist)
    return reqs


def log_model(ckpt_path: Path, run_id: str, uri: str | None = None) -> str:
    """Log the checkpoint ``ckpt_path`` of run ``run_id`` as an MLflow model (without its
    training state); returns the logged model's id. A run that already logged these weights
    keeps its model (a requeued, finished run logs nothing twice)."""
    import mlflow
    import mlflow.pyfunc
    from mlflow.models import Model

    from taskcodec import checkpoints
    from taskcodec.codecs.loading import header_name

    client = _client(uri)
    ckpt = checkpoints.load(ckpt_path)
    slim = checkpoints.without_training_state(ckpt)
    fingerprint = str(slim.get("fingerprint", ""))
    run = client.get_run(run_id)
    tags = run.data.tags
    if fingerprint and tags.get(MODEL_FINGERPRINT_TAG) == fingerprint and tags.get(MODEL_ID_TAG):
        return tags[MODEL_ID_TAG]
    args = slim.get("model_args") or {"kind": "codec"}
    kind = args.get("kind", "codec")
    # Made here, in the run's experiment: left to Model.log, a model logged after the run
    # ended (taskcodec register) would go to whatever experiment this process points at.
    model = client.create_logged_model(
        experiment_id=run.info.experiment_id, name=header_name(args, slim["config"]),
        source_run_id=run_id, params=dict(run.data.params), model_type=f"taskcodec-{kind}",
        tags={"fingerprint": fingerprint, "kind": kind,
              "taskcodec_version": str(slim.get("taskcodec_version", ""))})
    mlflow.set_tracking_uri(client.tracking_uri)  # Model.log speaks to the global URI
    with tempfile.TemporaryDirectory(prefix="taskcodec-model-") as tmp:
        data = checkpoints.save_atomic(slim, Path(tmp) / DATA_FILE)
        Model.log(artifact_path=None, name=model.name, flavor=mlflow.pyfunc, run_id=run_id,
                  model_id=model.model_id, step=int(slim.get("step", 0)),
                  loader_module=__name__, data_path=str(data),
                  pip_requirements=_requirements())
    client.set_tag(run_id, MODEL_ID_TAG, model.model_id)
    client.set_tag(run_id, MODEL_FINGERPRINT_TAG, fingerprint)
    return model.model_id


def register(model_id: str, run_id: str, name: str, aliases: Sequence[str] = (),
             uri: str | None = None) -> ModelVersionRef:
    """Make the logged model a version of ``name`` (the same version again if it is one
    already) and point ``aliases`` at it."""
    import mlflow

    client = _client(uri)
    # Searched versions may lack model_id; their source is models:/MODEL_ID all the same.
    existing = [v for v in client.search_model_versions(f"name = '{name}'", max_results=1000)
                if model_id in (getattr(v, "model_id", None), (v.source or "").removeprefix(
                    MODELS_PREFIX))]
    if existing:
        version = existing[0]
    else:
        mlflow.set_tracking_uri(client.tracking_uri)
        version = mlflow.register_model(f"{MODELS_PREFIX}{model_id}", name)
    for alias in aliases:
        client.set_registered_model_alias(name, alias, str(version.version))
    return ModelVersionRef(name=name, version=str(version.version), run_id=run_id,
                           model_id=model_id, source=version.source or "")


def publish(run_id: str, register_as: str = "", aliases: Sequence[str] = (),
            ckpt_path: Path | None = None, uri: str | None = None) -> ModelVersionRef | None:
    """Log run ``run_id``'s codec as an MLflow model and, with ``register_as`` (``NAME`` or
    ``NAME@ALIAS``), register it. ``ckpt_path``: its checkpoint on disk; without it, the
    run's best checkpoint (its last, if it never validated) is fetched from the run."""
    from taskcodec import checkpoints

    name, alias = check_name(register_as) if register_as else ("", "")
    aliases = [check_alias(a) for a in (*([alias] if alias else []), *aliases)]
    if aliases and not name:
        raise ConfigError("an alias needs a model name to register under")
    model_id = ""
    if ckpt_path is None:  # the model the run logged, else one from its checkpoint
        if not checkpoints.RUN_ID_RE.match(run_id):
            raise ConfigError(f"{run_id!r} is not an MLflow run id (32 hex characters)")
        client = _client(uri)
        try:
            model_id = client.get_run(run_id).data.tags.get(MODEL_ID_TAG, "")
        except Exception as err:
            raise TrackingError(f"no MLflow run {run_id!r} at {client.tracking_uri}: "
                                f"{_first_line(err)}") from None
    if not model_id:
        with tempfile.TemporaryDirectory(prefix="taskcodec-ckpt-") as tmp:
            path = ckpt_path or checkpoints.resolve(run_id, "best", Path(tmp))
            model_id = log_model(path, run_id, uri)
    if not name:
        return None
    try:
        return register(model_id, run_id, name, aliases, uri)
    except Exception as err:
        raise TrackingError(f"cannot register run {run_id}'s model as {name!r}: "
                            f"{_first_line(err)}") from None


def evaluated_by(ref: str, client) -> list:
    """The evaluate runs of the model version ``ref`` names (``compare --run-id models:/...``):
    runs tagged with its training run as ``evaluated_run_id``, in any experiment."""
    found = resolve(ref, client.tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments(max_results=1000)]
    runs = client.search_runs(experiments, f"tags.evaluated_run_id = '{found.run_id}' and "
                              "tags.entry_point = 'evaluate'", max_results=1000)
    if not runs:
        raise CheckpointError(f"{ref} ({found}, run {found.run_id}) has no evaluate runs yet: "
                              f"taskcodec evaluate --checkpoint {ref}")
    return list(runs)


# -- the python_function flavour -------------------------------------------------------------
class PyfuncCodec:
    """What ``mlflow.pyfunc.load_model`` returns for a taskcodec model: ``predict`` compresses
    images (uint8 ``H x W x 3`` arrays, or a list of them) into taskcodec files."""

    def __init__(self, codec: Any) -> None:
        self.codec = codec  # a taskcodec.codecs.loading.LoadedCodec

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> list[bytes]:
        import numpy as np
        import torch

        from taskcodec.data.transforms import to_float

        images = [model_input] if isinstance(model_input, np.ndarray) and model_input.ndim == 3 \
            else list(model_input)
        files = []
        for image in images:
            array = np.asarray(image)
            if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
                raise ConfigError(f"an image to compress is a uint8 H x W x 3 array, not "
                                  f"{array.dtype} of shape {array.shape}")
            files.append(self.codec.compress(to_float(torch.from_numpy(
                np.ascontiguousarray(array.transpose(2, 0, 1))))))
        return files


def _load_pyfunc(data_path: str) -> PyfuncCodec:
    """Called by ``mlflow.pyfunc.load_model`` with the model's ``data/model.pt``."""
    from taskcodec.codecs.loading import load_codec

    return PyfuncCodec(load_codec(data_path))
