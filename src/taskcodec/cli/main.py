"""``taskcodec``: train, evaluate and use learned image codecs.

Thin Click commands over library functions. Heavy modules (torch, mlflow) are imported inside
the commands, so ``--help`` answers at once. Any taskcodec error ends as one ``Error:`` line
with exit status 2; a run stopped by SIGTERM/SIGUSR1 after writing its checkpoint exits 75.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from taskcodec import __version__
from taskcodec.cli import compare_cmd, doctor_cmd
from taskcodec.cli.errors import Group
from taskcodec.cli.options import config_command
from taskcodec.config import (
    VBR_LEVELS,
    BaseConfig,
    EnhancementConfig,
    EvalConfig,
    LoopConfig,
    TrainConfig,
)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("alembic", "mlflow", "urllib3", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"],
                                           "max_content_width": 100})
@click.version_option(__version__, prog_name="taskcodec")
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def cli(verbose: bool) -> None:
    """Learned image compression for humans and machines.

    \b
    Examples:
      taskcodec train --codec bmshj2018-hyperprior --lmbda 0.0067 --epochs 100
      taskcodec evaluate --checkpoint RUN_ID
      taskcodec compress photo.png -o photo.tcd --checkpoint RUN_ID
      taskcodec decompress photo.tcd -o photo.png --checkpoint RUN_ID

    Runs go to $MLFLOW_TRACKING_URI, or to ./mlflow.db when it is unset
    (see them with `make mlflow-ui`); the experiment is $MLFLOW_EXPERIMENT_NAME or "taskcodec".
    """
    _setup_logging(verbose)


def _run_training(config: LoopConfig) -> None:
    from taskcodec import signals

    signals.install()  # before the slow imports: a signal now still gets a checkpoint
    from taskcodec.engine import is_preemption
    from taskcodec.engine import train as run_training

    try:
        run_id = run_training(config)
    except BaseException as err:
        if is_preemption(err):
            sys.exit(signals.PREEMPTED_EXIT)
        raise
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line per run, not per process
        click.echo(run_id)


@cli.command()
@config_command(TrainConfig)
def train(config: TrainConfig) -> None:
    """Train a codec as one MLflow run (resumable, preemption-safe).

    \b
    Examples:
      taskcodec train --lmbda 0.0483 --patch-size 256 --epochs 200
      taskcodec train --data ~/data/clic.tar --codec mbt2018-mean --N 192 --M 320
      taskcodec train --init-from RUN_ID --lmbda 0.0035     # fine-tune to a new lambda
      taskcodec train --resume RUN_ID                       # continue where it stopped
      taskcodec train --register-as my-codec@champion       # then models:/my-codec@champion
    """
    _run_training(config)


@cli.command("train-base")
@config_command(BaseConfig)
def train_base(config: BaseConfig) -> None:
    """Train a task base layer: a compressed representation for a machine task.

    loss = alpha * bpp + task loss + beta * reconstruction MSE. beta = 0 learns a plain task
    representation; beta > 0 a task-compatible one (also rewarded for keeping the input).

    \b
    Examples:
      taskcodec train-base                                  # detection on the embedded scenes
      taskcodec train-base --task segmentation --beta 100 --alpha 0.05
      taskcodec train-base --task detection --data coco:/data/coco --image-size 512
    """
    _run_training(config)


@cli.command("train-enhancement")
@config_command(EnhancementConfig)
def train_enhancement(config: EnhancementConfig) -> None:
    """Train an enhancement layer on top of a frozen base layer from an MLflow run.

    loss = alpha * (bpp_base + bpp_enh) + distortion (255^2 * MSE or 255 * RMSE, or
    cross-entropy for target=segmentation); upper: alpha * bpp_enh + distortion.
    method: conditional (entropy model only, as the papers) | conditional-decoder (taskcodec's
    extension) | residual | lower | upper (paper 1's baselines) | standalone-refit (paper 2).

    \b
    Examples:
      taskcodec train-enhancement --base-run RUN_ID --method conditional --alpha 128
      taskcodec train-enhancement --base-run RUN_ID --method residual --alpha 256
      taskcodec train-enhancement --base-run RUN_ID --method lower --alpha 128
      taskcodec train-enhancement --base-run RUN_ID --method standalone-refit \\
        --init-from CONDITIONAL_RUN_ID --alpha 128
      taskcodec train-enhancement --base-run RUN_ID --target segmentation --alpha 0.1
    """
    _run_training(config)


@cli.command()
@config_command(EvalConfig)
@click.option("--output-dir", type=click.Path(path_type=Path), default=None,
              help="also keep the per-image CSV and the reconstructions picture here")
def evaluate(config: EvalConfig, output_dir: Path | None) -> None:
    """Compress and decode every image with real bitstreams; log bpp, PSNR, MS-SSIM.

    \b
    Examples:
      taskcodec evaluate --checkpoint RUN_ID
      taskcodec evaluate --checkpoint checkpoints/RUN_ID/best.pt --data ~/data/kodak
      taskcodec evaluate --checkpoint RUN_ID --data ~/data/clic --split test
      taskcodec evaluate --checkpoint VBR_RUN_ID --rate 0,3,7   # a variable-rate codec

    A folder without train/val/test subfolders is evaluated whole (Kodak: all 24 images);
    the table's first line says how many images of which data (with a content digest).
    """
    from taskcodec.config import ANCHORS
    from taskcodec.evaluate import describe_data, format_table
    from taskcodec.evaluate import evaluate as run_evaluation

    result = run_evaluation(config, output_dir)
    rows = []
    for point in result.get("rates", [result]):
        at = "" if point.get("rate") is None else f" rate {point['rate']}"
        summary = point["summary"]
        rows.append((result["codec"] + at, summary))
        for name, label in ANCHORS.items():
            if f"{name}_bpp" in summary:
                rows.append((f"{label} (Pillow), nearest bpp{at}",
                             {k: summary[f"{name}_{k}"] for k in ("bpp", "psnr", "ms_ssim")}))
    click.echo(describe_data(result["data"]))
    click.echo(format_table(rows))
    for point in result.get("rates", [result]):
        at = "" if point.get("rate") is None else f" (rate {point['rate']})"
        click.echo(f"MLflow run: {point['run_id']}{at}")
    if result["failures"]:
        from taskcodec.errors import TaskcodecError

        for failure in result["failures"]:
            click.echo(f"Error: {failure}", err=True)
        raise TaskcodecError(f"{len(result['failures'])} images could not be evaluated; "
                             f"the results of the other {len(result['results'])} are logged")


def _read_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    from taskcodec.data.transforms import to_float, to_rgb, to_uint8_tensor

    try:
        with Image.open(path) as img:
            return to_float(to_uint8_tensor(to_rgb(img)))
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise click.BadParameter(f"cannot read image {path}: {err}") from None


_CKPT = click.option("--checkpoint", "-c", required=True, envvar="TASKCODEC_CHECKPOINT",
                     metavar="RUN_ID|MODEL|PATH",
                     help="MLflow run id, registered model (models:/NAME/VERSION or "
                          "models:/NAME@ALIAS) or checkpoint file [env: TASKCODEC_CHECKPOINT]")
_WHICH = click.option("--which", type=click.Choice(["best", "last"]), default="best",
                      show_default=True, help="which checkpoint of the run")
_CODEC = click.option("--codec", default="", metavar="NAME",
                      help="codec of a CompressAI checkpoint whose weights fit several")


@cli.command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="compressed file to write")
@_CKPT
@_WHICH
@_CODEC
@click.option("--rate", type=int, default=None, metavar="R",
              help=f"variable-rate codecs (*-vbr): the rate point, 0 (lowest) to {VBR_LEVELS - 1} "
                   "(default: the highest); the file records it, so decompress needs no --rate")
def compress(image: Path, output: Path, checkpoint: str, which: str, codec: str,
             rate: int | None) -> None:
    """Compress IMAGE into a taskcodec bitstream file.

    \b
    Examples:
      taskcodec compress kodim01.png -o kodim01.tcd --checkpoint RUN_ID
      taskcodec compress kodim01.png -o kodim01.tcd --checkpoint VBR_RUN_ID --rate 2
    """
    from taskcodec import bitstream
    from taskcodec.codecs.loading import load_codec

    x = _read_image(image)
    codec = load_codec(checkpoint, which, codec)
    rate = codec.default_rate if rate is None else rate
    data = codec.compress(x, rate)
    bitstream.write_bytes(output, data)
    h, w = x.shape[-2:]
    at = "" if rate is None else f", rate {rate}"
    click.echo(f"{output}: {len(data)} bytes, {8 * len(data) / (h * w):.4f} bpp "
               f"({w}x{h}, {codec.name} {codec.fingerprint}{at})", err=True)


_PREDICTION_SUFFIX = {"detection": ".json", "classification": ".json"}


@cli.command()
@click.argument("file", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="file to write (a PNG, or for --layer base the task's format); for a "
                   "folder FILE, the folder to write into")
@click.option("--layer", type=click.Choice(["all", "base"]), default="all", show_default=True,
              help="base: decode only the base layer and run the machine task on it, without "
                   "reading the enhancement bytes")
@click.option("--max-pixels", type=click.IntRange(min=1), default=None, metavar="N",
              envvar="TASKCODEC_MAX_PIXELS", show_envvar=True,
              help="refuse files whose image has more pixels (default 4096*4096): a header "
                   "can ask for any size")
@_CKPT
@_WHICH
@_CODEC
def decompress(file: Path, output: Path, layer: str, max_pixels: int | None, checkpoint: str,
               which: str, codec: str) -> None:
    """Decode a taskcodec bitstream FILE, or every file in the folder FILE.

    A single-layer file decodes to a PNG. A layered file decodes to the reconstruction (or the
    enhancement's segmentation); with --layer base, only the base layer is decoded and the
    machine task's output is written: detections as COCO results JSON, segmentation as a PNG
    of class ids, depth as a 16-bit PNG (depth * 256), classification as JSON.

    For a folder, each file's output goes into the folder OUTPUT under the file's name (with
    the output's suffix); a file that cannot be decoded is reported and the others go on, and
    the command ends with exit status 2 if any failed.

    \b
    Examples:
      taskcodec decompress kodim01.tcd -o kodim01.png --checkpoint RUN_ID
      taskcodec decompress scene.tcd --layer base -o detections.json --checkpoint RUN_ID
      taskcodec decompress received/ -o decoded/ --checkpoint RUN_ID
    """
    from taskcodec.codecs.loading import MAX_PIXELS, load_codec
    from taskcodec.errors import BitstreamError, TaskcodecError

    codec = load_codec(checkpoint, which, codec)
    if layer == "base" and codec.kind == "codec":
        raise BitstreamError(f"{file}: a single-layer {codec.name} file has no base layer")
    limit = max_pixels or MAX_PIXELS
    if not file.is_dir():
        _decompress_one(codec, file, output, layer, limit)
        return
    files = sorted(p for p in file.iterdir() if p.is_file() and not p.name.startswith("."))
    if output.exists() and not output.is_dir():
        raise click.BadParameter(f"{output} is not a folder (FILE {file} is one)",
                                 param_hint="-o/--output")
    output.mkdir(parents=True, exist_ok=True)
    base_only = layer == "base" or codec.kind == "base"
    suffix = _PREDICTION_SUFFIX.get(codec.task, ".png") if base_only else ".png"
    failed = []
    for path in files:
        try:
            _decompress_one(codec, path, output / (path.stem + suffix), layer, limit)
        except TaskcodecError as err:  # report it, go on with the others
            click.echo(f"Error: {err}", err=True)
            failed.append(path.name)
    if failed:
        raise BitstreamError(f"{len(failed)} of {len(files)} files in {file} could not be "
                             f"decoded: {', '.join(failed[:5])}{' ...' if len(failed) > 5 else ''}")


def _decompress_one(codec, file: Path, output: Path, layer: str, max_pixels: int) -> None:
    from taskcodec.errors import BitstreamError
    from taskcodec.outputs import write_image, write_prediction

    try:
        data = file.read_bytes()
    except OSError as err:
        raise BitstreamError(f"cannot read {file}: {err.strerror}") from None
    base_only = layer == "base" or codec.kind == "base"
    try:
        decoded = codec.decompress(data, layers={"base"} if base_only else None,
                                   max_pixels=max_pixels)
    except BitstreamError as err:
        raise BitstreamError(f"{file}: {err}") from None
    if base_only:
        write_prediction(codec.task, decoded["task"], output)
        click.echo(f"{output}: {codec.task} output of the base layer", err=True)
    elif "x_hat" in decoded:
        write_image(decoded["x_hat"], output)
        h, w = decoded["x_hat"].shape[-2:]
        click.echo(f"{output}: {w}x{h}", err=True)
    else:
        write_prediction("segmentation", decoded["logits"], output)
        click.echo(f"{output}: segmentation from both layers", err=True)


@cli.command()
@click.argument("run_id", metavar="RUN_ID")
@click.argument("name", metavar="NAME")
@click.option("--alias", "aliases", multiple=True, metavar="ALIAS",
              help="point ALIAS (e.g. champion) at the version (repeatable)")
def register(run_id: str, name: str, aliases: tuple[str, ...]) -> None:
    """Register the codec of training run RUN_ID in the MLflow Model Registry as NAME.

    The run's MLflow model (its best checkpoint, or its last if it never validated, without
    the training state; logged now if the run has none) becomes a version of NAME; if a
    version already holds it, that one is kept and only the aliases move. Prints
    models:/NAME/VERSION, usable wherever a run id is.

    \b
    Examples:
      taskcodec register RUN_ID kodak-hyperprior --alias champion
      taskcodec evaluate --checkpoint models:/kodak-hyperprior@champion
      taskcodec compress photo.png -o photo.tcd -c models:/kodak-hyperprior/1
    """
    from taskcodec import model_registry, tracking

    uri = tracking.tracking_uri()
    tracking.check_reachable(uri)
    click.echo(str(model_registry.publish(run_id, name, aliases, uri=uri)))


@cli.command("run-plan")
@click.argument("plan", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write {step: {command, run_id, seconds}} here as JSON")
def run_plan(plan: Path, results: Path | None) -> None:
    """Run a plan of trainings and evaluations in this one process (no start-up per run).

    PLAN is YAML or JSON: a list of steps {name, command, options}, commands train,
    train-base, train-enhancement, evaluate, options the settings of their --help
    (underscored). "${STEP}" in a setting is that earlier step's run id. Every step is
    checked before the first runs.

    \b
    Example PLAN.yaml:
      defaults: {train-base: {task: depth, max_steps: 300, N: 16, M: 16}}
      steps:
        - {name: base-s0, command: train-base, options: {seed: 0}}
        - {name: eval-s0, command: evaluate, options: {checkpoint: "${base-s0}"}}
    """
    from taskcodec.driver import load_plan, write_results
    from taskcodec.driver import run_plan as run_steps

    steps = load_plan(plan)
    done = run_steps(steps, on_step=lambda r: click.echo(
        f"{r.name}: {r.command} run {r.run_id} ({r.seconds:.0f} s)"))
    if results:
        write_results(done, results)


cli.add_command(compare_cmd.compare)
cli.add_command(doctor_cmd.doctor)


def main() -> None:
    cli(prog_name="taskcodec")


if __name__ == "__main__":
    main()
