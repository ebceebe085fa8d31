"""Trained codecs as MLflow models: logged at the end of training, registered, and used by
``models:/NAME@ALIAS`` alone (evaluate, compress, decompress, ``--init-from``, compare); the
training and evaluation data sets as run inputs; the system-metrics switch and its rendering
into launched jobs.

One tiny codec (N=M=8, 32-pixel crops, 2 steps) is trained in this process against the
session's real MLflow server (artifacts proxied by the server, as on the team server),
registered and evaluated once; the tests read what that left behind.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from taskcodec.errors import CheckpointError, ConfigError

NAME = "tiny-codec"
BASE = "registered-base-layer"
TINY = {"N": 8, "M": 8, "patch_size": 32, "batch_size": 2, "max_val_images": 1,
        "max_side": 128, "log_every": 1, "epochs": 1, "epoch_length": 4, "max_steps": 2}
SYSTEM_METRICS = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"


def invoke(*args: str):
    from taskcodec.cli.main import cli

    return CliRunner().invoke(cli, list(args))


def errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("Error:")]


def write_image(path: Path) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


@pytest.fixture(scope="module")
def registry(mlflow_server, module_env, tmp_path_factory) -> dict:
    """Train with --register-as tiny-codec@candidate and --system-metrics true (sampled every
    0.5 s), register again with `taskcodec register ... --alias champion`, delete the local
    checkpoints (a copy of best.pt is kept aside) and evaluate by models:/tiny-codec@champion."""
    from taskcodec.config import TrainConfig
    from taskcodec.engine import train

    work = tmp_path_factory.mktemp("registry")
    with module_env(mlflow_server.uri, work, "model-registry"), \
            pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
        run_id = train(TrainConfig.from_dict({**TINY, "register_as": f"{NAME}@candidate",
                                              "system_metrics": True}))
        best = shutil.copy(work / "checkpoints" / run_id / "best.pt", work / "best-copy.pt")
        registered = invoke("register", run_id, NAME, "--alias", "champion")
        shutil.rmtree(work / "checkpoints")  # from now on, only the registry has the weights
        evaluated = invoke("evaluate", "--checkpoint", f"models:/{NAME}@champion",
                           "--max-images", "1", "--jpeg", "false", "--max-side", "128")
    eval_id = evaluated.stdout.split("MLflow run: ")[-1].split()[0] if evaluated.exit_code == 0 \
        else ""
    return {"run_id": run_id, "best": Path(best), "registered": registered,
            "evaluated": evaluated, "eval_id": eval_id, "uri": mlflow_server.uri, "work": work}


# -- the Done-when of issue 17 ---------------------------------------------------------------
@pytest.mark.server
def test_a_registered_codec_is_evaluated_and_its_files_decoded_by_its_alias_alone(
        registry, mlflow_server, tmp_path, monkeypatch):
    store = client(mlflow_server.uri)
    registered = registry["registered"]
    assert registered.exit_code == 0, registered.output
    # --register-as made version 1; registering the same run again keeps it, moves the alias
    assert registered.stdout.strip() == f"models:/{NAME}/1"
    aliases = {a: str(v) for a, v in store.get_registered_model(NAME).aliases.items()}
    assert aliases == {"candidate": "1", "champion": "1"}

    evaluated = registry["evaluated"]
    assert evaluated.exit_code == 0, evaluated.output
    run = store.get_run(registry["eval_id"])
    assert run.data.tags["evaluated_run_id"] == registry["run_id"]
    assert run.data.tags["evaluated_model"] == f"{NAME}/1"
    assert run.data.params["checkpoint"] == f"models:/{NAME}@champion"
    assert run.data.metrics["bpp"] > 0
    model = store.get_logged_model(run.data.tags["evaluated_model_id"])
    assert {"bpp", "psnr"} <= {m.key for m in model.metrics}  # shown on the model's page too

    monkeypatch.chdir(tmp_path)
    image = write_image(tmp_path / "photo.png")
    ref = f"models:/{NAME}@champion"
    assert invoke("compress", str(image), "-o", "by-alias.tcd", "-c", ref).exit_code == 0
    decoded = invoke("decompress", "by-alias.tcd", "-o", "decoded.png", "-c", ref)
    assert decoded.exit_code == 0, decoded.output
    from PIL import Image

    with Image.open(tmp_path / "decoded.png") as png:
        assert png.size == (64, 48)
    # the registered model codes exactly as the run's own checkpoint does
    assert invoke("compress", str(image), "-o", "by-file.tcd", "-c",
                  str(registry["best"])).exit_code == 0
    assert (tmp_path / "by-alias.tcd").read_bytes() == (tmp_path / "by-file.tcd").read_bytes()


@pytest.mark.server
def test_training_logged_its_codec_as_a_model_without_the_training_state(
        registry, mlflow_server, tmp_path):
    import mlflow.artifacts
    import torch

    store = client(mlflow_server.uri)
    run = store.get_run(registry["run_id"])
    (output,) = run.outputs.model_outputs
    model = store.get_logged_model(output.model_id)
    assert model.source_run_id == registry["run_id"] and model.status == "READY"
    assert model.experiment_id == run.info.experiment_id
    assert run.data.tags["logged_model_id"] == model.model_id
    path = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{model.artifact_location}/data/model.pt", dst_path=str(tmp_path),
        tracking_uri=mlflow_server.uri)
    held = torch.load(path, map_location="cpu", weights_only=True)
    full = torch.load(registry["best"], map_location="cpu", weights_only=True)
    assert "optimizer" not in held and "aux_optimizer" not in held
    assert held["fingerprint"] == full["fingerprint"] == model.tags["fingerprint"]
    assert held["model_args"] == full["model_args"] and held["config"] == full["config"]
    assert Path(path).stat().st_size < registry["best"].stat().st_size
    # a pyfunc model: MLflow loads it by its alias and it compresses like taskcodec does
    import numpy as np

    from taskcodec.codecs.loading import load_codec
    from taskcodec.data.transforms import to_float

    image = np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    pyfunc = mlflow_pyfunc_load(f"models:/{NAME}@champion")
    (data,) = pyfunc.predict(image)
    x = to_float(torch.from_numpy(image.transpose(2, 0, 1).copy()))
    assert data == load_codec(str(registry["best"])).compress(x)


def mlflow_pyfunc_load(uri: str):
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(uri)


@pytest.mark.server
def test_unknown_model_version_and_alias_are_one_line_each(registry, mlflow_server):
    from taskcodec.checkpoints import load_ref

    cases = {
        "models:/no-such-codec@champion": "models:/no-such-codec@champion: no registered model "
                                          f"'no-such-codec' at {mlflow_server.uri} (registered: ",
        f"models:/{NAME}/7": f"models:/{NAME}/7: model '{NAME}' has no version 7 (versions: 1)",
        f"models:/{NAME}@gold": f"models:/{NAME}@gold: model '{NAME}' has no alias 'gold' "
                                "(aliases: candidate -> 1, champion -> 1; set one with "
                                f"taskcodec register RUN_ID {NAME} --alias gold)",
        f"models:/{NAME}": f"'models:/{NAME}' is not a registered model reference (write "
                           "models:/NAME/VERSION or models:/NAME@ALIAS)",
    }
    for ref, message in cases.items():
        with pytest.raises(CheckpointError) as err:
            load_ref(ref)
        assert str(err.value).startswith(message), str(err.value)
        assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="--which last is for run ids"):
        load_ref(f"models:/{NAME}@champion", "last")
    result = invoke("evaluate", "--checkpoint", f"models:/{NAME}@gold")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert errors(result) == [f"Error: {cases[f'models:/{NAME}@gold']}"]


@pytest.mark.server
def test_init_from_a_registered_model_takes_its_weights_and_architecture(
        registry, mlflow_server, tmp_path, monkeypatch):
    from taskcodec.config import TrainConfig
    from taskcodec.engine import train

    monkeypatch.chdir(tmp_path)
    settings = {k: v for k, v in TINY.items() if k not in ("N", "M", "max_steps")}
    run_id = train(TrainConfig.from_dict({**settings, "max_steps": 1,
                                          "init_from": f"models:/{NAME}@candidate"}))
    run = client(mlflow_server.uri).get_run(run_id)
    assert (run.data.params["N"], run.data.params["M"]) == ("8", "8")  # from the model
    assert run.data.tags["init_from"] == f"models:/{NAME}@candidate"
    # without --system-metrics (and its variable) a run has no system metrics
    assert not [k for k in run.data.metrics if k.startswith("system/")]
    assert [k for k in client(mlflow_server.uri).get_run(registry["run_id"]).data.metrics
            if k.startswith("system/cpu")]
    # --base-run resolves the same way (this model is a plain codec, so it is refused as one)
    from taskcodec.codecs.rebuild import load_base

    with pytest.raises(CheckpointError, match=f"^base_run=models:/{NAME}@champion: its "
                                              "checkpoint is a codec model, not a train-base run"):
        load_base(f"models:/{NAME}@champion")


@pytest.mark.server
def test_compare_takes_a_registered_model_as_its_evaluate_runs(registry, mlflow_server):
    from taskcodec.compare.selection import select_runs

    runs = select_runs(client(mlflow_server.uri), run_ids=[f"models:/{NAME}@champion",
                                                           registry["eval_id"]])
    assert [r.info.run_id for r in runs] == [registry["eval_id"]]


@pytest.mark.server
def test_training_and_evaluation_data_sets_are_run_inputs(registry, mlflow_server):
    store = client(mlflow_server.uri)

    def inputs(run_id: str) -> set[tuple[str, str]]:
        return {(i.dataset.name, {t.key: t.value for t in i.tags}["mlflow.data.context"])
                for i in store.get_run(run_id).inputs.dataset_inputs}

    assert inputs(registry["run_id"]) == {("embedded-train", "training"),
                                          ("embedded-val", "validation")}
    assert inputs(registry["eval_id"]) == {("embedded-val", "evaluation")}


@pytest.mark.server
def test_an_enhancement_on_a_registered_base_is_tagged_with_the_base_training_run(
        mlflow_server, caplog):
    """evaluate's base_run_id of a base given as models:/NAME/VERSION or models:/NAME@ALIAS: the
    run that logged that version. Runs and versions made directly: the session's server costs
    no training, and no store creation as a fresh sqlite file does (7-10 s here)."""
    from taskcodec.evaluate import base_tags
    from taskcodec.model_registry import MODEL_FINGERPRINT_TAG

    uri = mlflow_server.uri
    mlflow = client(uri)
    experiment = mlflow.create_experiment("registered-base")
    runs = []
    for fingerprint in ("f1", "f2"):
        run_id = mlflow.create_run(experiment).info.run_id
        mlflow.set_tag(run_id, MODEL_FINGERPRINT_TAG, fingerprint)
        runs.append(run_id)
    mlflow.create_registered_model(BASE)
    for run_id in runs:
        mlflow.create_model_version(BASE, f"runs:/{run_id}/model", run_id=run_id)
    mlflow.set_registered_model_alias(BASE, "champion", "1")
    first = {"base_model_uri": f"models:/{BASE}/1", "base_model": f"{BASE}/1",
             "base_run_id": runs[0]}
    assert base_tags(f"models:/{BASE}/1", "f1", uri) == first
    assert base_tags(f"models:/{BASE}@champion", "f1", uri) == {
        **first, "base_model_uri": f"models:/{BASE}@champion"}
    # A checkpoint without the base fingerprint is taken at its word.
    assert base_tags(f"models:/{BASE}/2", "", uri)["base_run_id"] == runs[1]
    assert base_tags(runs[1], "f2", uri) == {"base_run_id": runs[1]}
    assert base_tags("checkpoints/base.pt", "f1", uri) == {}
    # The alias moved on after the enhancement was trained: no link to the wrong run.
    mlflow.set_registered_model_alias(BASE, "champion", "2")
    assert base_tags(f"models:/{BASE}@champion", "f1", uri) == {
        "base_model_uri": f"models:/{BASE}@champion"}
    assert "now holds other weights" in caplog.text
    assert base_tags("models:/gone/1", "f1", uri) == {"base_model_uri": "models:/gone/1"}
    assert "no registered model 'gone'" in caplog.text


# -- without a server --------------------------------------------------------------------------
def test_listing_digest_names_the_data_without_reading_it(tmp_path):
    from taskcodec.data import build_dataset
    from taskcodec.evaluate import listing_info

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        for name in ("x.png", "y.png"):
            write_image(tmp_path / folder / name)
    a, b = (listing_info(build_dataset(str(tmp_path / f), "all"), "photos", "all")
            for f in ("a", "b"))
    assert a == b and a["images"] == 2  # the same files, wherever they are
    (tmp_path / "b" / "y.png").rename(tmp_path / "b" / "z.png")
    assert listing_info(build_dataset(str(tmp_path / "b"), "all"), "photos",
                        "all")["data_digest"] != a["data_digest"]
    scenes = [listing_info(build_dataset("scenes", "val", patch_size=32, data_seed=seed,
                                         epoch_length=2), "scenes", "val", seed)
              for seed in (0, 1)]
    assert scenes[0]["data_digest"] != scenes[1]["data_digest"]


def test_register_as_and_aliases_are_checked_before_any_work():
    from taskcodec.config import TrainConfig
    from taskcodec.model_registry import check_alias

    with pytest.raises(ConfigError, match=r"^register_as='my codec' is not a model name"):
        TrainConfig.from_dict({"register_as": "my codec"})
    assert TrainConfig.from_dict({"register_as": "my-codec@champion"}).register_as
    for alias in ("latest", "v3", "a b"):
        with pytest.raises(ConfigError, match="is not a usable alias"):
            check_alias(alias)
    result = invoke("register", "not-a-run-id", NAME)
    assert result.exit_code == 2
    assert errors(result) == ["Error: 'not-a-run-id' is not an MLflow run id (32 hex characters)"]


def test_launched_jobs_log_system_metrics_unless_told_otherwise():
    from taskcodec.launch import k8s, slurm
    from taskcodec.launch.spec import JobSpec

    spec = JobSpec(entry_point="train", params={"lmbda": "0.0067"})
    options = slurm.SlurmOptions(output_dir="/tmp/logs")

    def exports(job: JobSpec) -> list[str]:
        return [line for line in slurm.render_sbatch(job, options).splitlines()
                if line.startswith(f"export {SYSTEM_METRICS}=")]

    assert exports(spec) == [f"export {SYSTEM_METRICS}=true"]
    assert exports(replace(spec, env={SYSTEM_METRICS: "false"})) == [
        f"export {SYSTEM_METRICS}=false"]
    assert exports(replace(spec, pass_env=[SYSTEM_METRICS])) == []  # the user's own value
    contained = slurm.render_sbatch(replace(spec, image="/images/taskcodec.sif"), options)
    (names,) = [line for line in contained.splitlines() if line.startswith("pass_env=(")]
    assert SYSTEM_METRICS in names.removeprefix("pass_env=(").rstrip(")").split()  # past --cleanenv

    job = replace(spec, image="registry.example.org/lab/taskcodec:1")
    opts = k8s.K8sOptions(job_name="taskcodec-train-metrics", namespace="ml")

    def env(job: JobSpec, opts) -> list[dict]:
        (manifest,) = k8s.render_jobs(job, opts, ["a" * 32])
        (container,) = manifest["spec"]["template"]["spec"]["containers"]
        return [e for e in container["env"] if e["name"] == SYSTEM_METRICS]

    assert env(job, opts) == [{"name": SYSTEM_METRICS, "value": "true"}]
    assert env(replace(job, env={SYSTEM_METRICS: "false"}), opts) == [
        {"name": SYSTEM_METRICS, "value": "false"}]
    secret = replace(opts, secret_env={SYSTEM_METRICS: "metrics:enabled"})
    assert [e.get("value") for e in env(job, secret)] == [None]  # from the Secret only
