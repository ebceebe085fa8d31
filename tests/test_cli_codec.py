"""``taskcodec compress`` and ``taskcodec decompress``: a real round trip through files, and
every kind of bad file ending in one ``Error:`` line, exit status 2 and no output file."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from taskcodec.cli.main import cli

TASKCODEC = str(Path(sys.executable).parent / "taskcodec")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, module_env) -> dict[str, Path]:
    """``best.pt`` of two tiny training runs that differ only in their seed."""
    from taskcodec.config import TrainConfig
    from taskcodec.engine import train

    folder = tmp_path_factory.mktemp("cli-codec-runs")
    with module_env(f"sqlite:///{folder / 'mlflow.db'}", folder, "test-cli-codec"):
        for name, seed in (("a", 0), ("b", 1)):
            train(TrainConfig.from_dict({
                "N": 8, "M": 8, "patch_size": 32, "batch_size": 2, "epochs": 1,
                "epoch_length": 4, "max_val_images": 1, "max_side": 128, "seed": seed,
                "checkpoint_dir": str(folder / name)}))
    return {name: folder / name / "best.pt" for name in ("a", "b")}


def _embedded_png(folder: Path, max_side: int) -> Path:
    from taskcodec.data.embedded import load_embedded

    image, _ = load_embedded("chelsea", max_side)
    path = folder / "chelsea.png"
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    return path


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """An embedded photograph, 128x85 (odd height), as a PNG."""
    return _embedded_png(tmp_path_factory.mktemp("photo"), 128)


@pytest.fixture(scope="module")
def encoded(checkpoints, photo, tmp_path_factory) -> bytes:
    """``photo`` compressed with checkpoint a (through the CLI)."""
    out = tmp_path_factory.mktemp("encoded") / "chelsea.tcd"
    result = CliRunner().invoke(cli, ["compress", str(photo), "-o", str(out),
                                      "-c", str(checkpoints["a"])])
    assert result.exit_code == 0, result.output
    return out.read_bytes()


def read_png(path: Path) -> torch.Tensor:
    with Image.open(path) as img:
        assert img.mode == "RGB"
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([TASKCODEC, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL, check=False)


# --- evaluate: what it measured, over what the user meant -----------------------------------


def test_evaluate_measures_every_image_of_a_flat_folder_and_logs_the_data_set(checkpoints,
                                                                               tmp_path):
    import mlflow

    from taskcodec.evaluate import data_name

    rng = np.random.default_rng(0)
    folder = tmp_path / "kodak"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(
            folder / f"kodim{i:02d}.png")
    args = ["evaluate", "--checkpoint", str(checkpoints["a"]), "--data", str(folder),
            "--jpeg", "false"]
    whole = CliRunner().invoke(cli, args)
    assert whole.exit_code == 0, whole.output
    first = whole.output.splitlines()[0]
    assert first.startswith(f"5 images of {folder} (split all, digest "), first
    run_id = whole.output.split("MLflow run: ")[1].split()[0]
    run = mlflow.tracking.MlflowClient().get_run(run_id)
    digest = run.data.tags["data_digest"]
    assert run.data.params["images"] == "5" and run.data.params["data_digest"] == digest
    assert run.data.tags["data_name"] == "kodak" == data_name(f"{folder}/")
    inputs = run.inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("kodak-all", digest)]
    # Explicit splits still work; other images are other data (another digest).
    val = CliRunner().invoke(cli, [*args, "--split", "val"])
    assert val.exit_code == 0 and val.output.startswith("1 image of "), val.output
    assert f"digest {digest}" not in val.output.splitlines()[0]


# --- the round trip --------------------------------------------------------------------------


@pytest.mark.slow  # two processes that import torch
def test_compress_then_decompress_round_trips_with_evaluates_quality(checkpoints, photo,
                                                                     tmp_path):
    from taskcodec.codecs.loading import load_codec
    from taskcodec.evaluate import evaluate_image
    from taskcodec.metrics import psnr

    ckpt = str(checkpoints["a"])
    compressed = run("compress", str(photo), "-o", "chelsea.tcd", "-c", ckpt, cwd=tmp_path)
    assert compressed.returncode == 0, compressed.stderr
    data = (tmp_path / "chelsea.tcd").read_bytes()
    assert data[:4] == b"TCDC"
    assert f"chelsea.tcd: {len(data)} bytes, {8 * len(data) / (128 * 85):.4f} bpp (128x85, " \
        "bmshj2018-factorized " in compressed.stderr

    decompressed = run("decompress", "chelsea.tcd", "-o", "back.png", "-c", ckpt, cwd=tmp_path)
    assert decompressed.returncode == 0, decompressed.stderr
    assert "back.png: 128x85" in decompressed.stderr
    back = read_png(tmp_path / "back.png")
    original = read_png(photo)
    assert back.shape == original.shape == (3, 85, 128)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back.png", "chelsea.tcd"]

    # The same numbers as `taskcodec evaluate` measures on that image.
    x = original.float() / 255
    result, x_hat = evaluate_image(load_codec(ckpt), x)
    assert result.num_bytes == len(data)
    assert torch.equal(x_hat.mul(255).round().byte(), back)
    assert psnr(x[None], back[None].float() / 255) == pytest.approx(result.psnr, abs=0.05)


def test_grayscale_and_rgba_images_are_coded_as_rgb(checkpoints, tmp_path):
    runner = CliRunner()
    ckpt = str(checkpoints["a"])
    for mode in ("L", "RGBA"):
        source = tmp_path / f"{mode}.png"
        Image.new(mode, (70, 50), 128).save(source)
        result = runner.invoke(cli, ["compress", str(source), "-o", str(tmp_path / f"{mode}.tcd"),
                                     "-c", ckpt])
        assert result.exit_code == 0, result.output
        result = runner.invoke(cli, ["decompress", str(tmp_path / f"{mode}.tcd"),
                                     "-o", str(tmp_path / f"{mode}-back.png"), "-c", ckpt])
        assert result.exit_code == 0, result.output
        assert read_png(tmp_path / f"{mode}-back.png").shape == (3, 50, 70)


# --- bad files: one line, status 2, nothing written ------------------------------------------


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x40]) + data[index + 1:]


BAD_FILES = {  # how to damage a good file -> what the error line must say
    "truncated payload": (lambda d: d[:-7], "truncated bitstream"),
    "truncated header": (lambda d: d[:12], "truncated bitstream"),
    "empty": (lambda d: b"", "not a taskcodec bitstream: it is empty"),
    "flipped payload byte": (lambda d: _flip(d, len(d) - 3), "CRC mismatch in layer 'main'"),
    "flipped header byte": (lambda d: _flip(d, 8), "header CRC mismatch"),
    "trailing bytes": (lambda d: d + b"\0", "trailing garbage"),
    "random bytes": (lambda d: bytes(range(256)) * 3, "not a taskcodec bitstream"),
    "png": (None, "not a taskcodec bitstream (magic b'\\x89PNG'"),
}


def _bad_file(kind: str, encoded: bytes, photo: Path, folder: Path) -> Path:
    make, _ = BAD_FILES[kind]
    path = folder / "bad.tcd"
    path.write_bytes(photo.read_bytes() if make is None else make(encoded))
    return path


def assert_refused(result, bad: Path, output: Path) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert not output.exists()
    assert sorted(p.name for p in output.parent.iterdir()) == [bad.name]  # no temp file left
    return lines[0]


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_decompress_refuses_a_damaged_or_foreign_file(kind, checkpoints, encoded, photo,
                                                      tmp_path):
    bad = _bad_file(kind, encoded, photo, tmp_path)
    out = tmp_path / "out.png"
    result = CliRunner().invoke(cli, ["decompress", str(bad), "-o", str(out),
                                      "-c", str(checkpoints["a"])])
    line = assert_refused(result, bad, out)
    assert line.startswith(f"Error: {bad}: ")  # names the file
    assert BAD_FILES[kind][1] in line


def test_decompress_refuses_a_file_made_with_another_checkpoint(checkpoints, encoded, tmp_path):
    from taskcodec.codecs.loading import load_codec

    bad = tmp_path / "a.tcd"
    bad.write_bytes(encoded)
    out = tmp_path / "out.png"
    result = CliRunner().invoke(cli, ["decompress", str(bad), "-o", str(out),
                                      "-c", str(checkpoints["b"])])
    line = assert_refused(result, bad, out)
    assert load_codec(str(checkpoints["a"])).fingerprint in line
    assert load_codec(str(checkpoints["b"])).fingerprint in line


def test_decompress_of_a_truncated_file_is_one_line_from_the_real_command(checkpoints,
                                                                          encoded, tmp_path):
    bad = tmp_path / "cut.tcd"
    bad.write_bytes(encoded[: len(encoded) // 2])
    result = run("decompress", bad.name, "-o", "out.png", "-c", str(checkpoints["a"]),
                 cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("Error: cut.tcd: ") and "truncated" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.tcd"]


def test_compress_refuses_a_missing_or_broken_checkpoint_without_writing(photo, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    out = tmp_path / "x.tcd"
    for ckpt, expected in ((tmp_path / "missing.pt", "is neither an existing file nor an MLflow "
                            "run id"),
                           (broken, f"cannot load checkpoint {broken}")):
        result = CliRunner().invoke(cli, ["compress", str(photo), "-o", str(out), "-c", str(ckpt)])
        assert result.exit_code == 2
        assert result.stderr.startswith("Error: ") and expected in result.stderr
        assert result.stderr.count("\n") == 1
        assert not out.exists()


def test_compress_refuses_a_file_that_is_not_an_image(checkpoints, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("hello")
    result = CliRunner().invoke(cli, ["compress", str(text), "-o", str(tmp_path / "x.tcd"),
                                      "-c", str(checkpoints["a"])])
    assert result.exit_code == 2
    assert f"cannot read image {text}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x.tcd").exists()


def test_decompress_of_a_folder_reports_bad_files_and_decodes_the_others(checkpoints, encoded,
                                                                         tmp_path):
    folder = tmp_path / "received"
    folder.mkdir()
    (folder / "a.tcd").write_bytes(encoded)
    (folder / "b-cut.tcd").write_bytes(encoded[: len(encoded) // 2])
    (folder / "c.tcd").write_bytes(encoded)
    (folder / "d-not-a-bitstream.tcd").write_bytes(b"\x89PNG\r\n\x1a\n")
    out = tmp_path / "decoded"
    result = CliRunner().invoke(cli, ["decompress", str(folder), "-o", str(out),
                                      "-c", str(checkpoints["a"])])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 3, result.stderr  # two files, then the summary line
    assert "b-cut.tcd" in errors[0] and "truncated" in errors[0]
    assert "d-not-a-bitstream.tcd" in errors[1] and "not a taskcodec bitstream" in errors[1]
    assert errors[2].startswith(f"Error: 2 of 4 files in {folder} could not be decoded")
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "c.png"]
    assert torch.equal(read_png(out / "a.png"), read_png(out / "c.png"))


def test_decompress_refuses_an_image_over_max_pixels(checkpoints, encoded, tmp_path):
    bad = tmp_path / "chelsea.tcd"
    bad.write_bytes(encoded)
    out = tmp_path / "out.png"
    result = CliRunner().invoke(cli, ["decompress", str(bad), "-o", str(out), "--max-pixels",
                                      "10000", "-c", str(checkpoints["a"])])
    line = assert_refused(result, bad, out)
    assert "(10880 pixels) is over this decoder's limit of 10000 pixels" in line


def test_evaluate_reports_a_bad_image_and_logs_the_others(checkpoints, photo, tmp_path):
    import mlflow

    val = tmp_path / "data" / "val"
    val.mkdir(parents=True)
    (tmp_path / "data" / "train").mkdir()
    (tmp_path / "data" / "train" / "t.png").write_bytes(photo.read_bytes())
    (val / "a.png").write_bytes(photo.read_bytes())
    (val / "b.png").write_bytes(b"not an image at all")
    (val / "c.png").write_bytes(photo.read_bytes())
    result = CliRunner().invoke(cli, ["evaluate", "--checkpoint", str(checkpoints["a"]),
                                      "--data", str(tmp_path / "data"), "--jpeg", "false"])
    assert result.exit_code == 2, (result.output, result.exception)
    errors = result.stderr.splitlines()[-2:]
    assert errors[0].startswith("Error: image 1: ") and "b.png" in errors[0], result.stderr
    assert errors[1] == ("Error: 1 images could not be evaluated; the results of the other 2 "
                         "are logged")
    run_id = result.stdout.split("MLflow run: ")[1].split()[0]
    run = mlflow.get_run(run_id)
    assert run.data.params["images"] == "2" and run.data.tags["failed_images"] == "1"
    assert run.data.metrics["psnr"] > 0  # the mean over the two good images is logged


# --- CompressAI interop: its own evaluator on our checkpoints, its checkpoints here ---------


@pytest.fixture(scope="module")
def big_photo(tmp_path_factory) -> Path:
    """An embedded photograph, 256x170: CompressAI's MS-SSIM needs over 160 px a side."""
    return _embedded_png(tmp_path_factory.mktemp("big-photo"), 256)


def _compressai_inference(net, photo: Path) -> dict:
    from compressai.utils.eval_model.__main__ import inference, read_image

    with torch.no_grad():
        return inference(net, read_image(photo))


def _taskcodec_measure(codec, photo: Path) -> tuple[float, float, float]:
    """(file bpp, payload bpp, PSNR on 8-bit values) of ``taskcodec``'s own round trip."""
    from taskcodec import bitstream
    from taskcodec.evaluate import evaluate_image
    from taskcodec.metrics import psnr

    x = read_png(photo).float() / 255
    result, x_hat = evaluate_image(codec, x)
    data = codec.compress(x)
    _, layers = bitstream.unpack(data)
    payload = sum(len(s) for layer in layers for s in layer.strings)
    pixels = x.shape[-2] * x.shape[-1]
    assert result.bpp == pytest.approx(8 * len(data) / pixels)
    eight_bit = (x_hat * 255).clamp(0, 255).round() / 255
    return result.bpp, 8 * payload / pixels, psnr(x.unsqueeze(0), eight_bit.reshape(1, *x.shape))


def test_compressai_eval_model_reads_a_taskcodec_checkpoint_as_it_is(checkpoints, big_photo):
    from compressai.utils.eval_model.__main__ import load_checkpoint

    from taskcodec.codecs.loading import load_codec

    net = load_checkpoint("bmshj2018-factorized", False, str(checkpoints["a"]))
    theirs = _compressai_inference(net, big_photo)
    file_bpp, payload_bpp, ours_psnr = _taskcodec_measure(load_codec(str(checkpoints["a"])),
                                                          big_photo)
    assert theirs["bpp"] == pytest.approx(payload_bpp, abs=1e-9)
    assert 0 < file_bpp - theirs["bpp"] < 8 * 64 / (256 * 170)  # taskcodec's header, < 64 bytes
    assert theirs["psnr-rgb"] == pytest.approx(ours_psnr, abs=1e-4)


def test_compressai_checkpoints_are_evaluated_coded_and_recognised(tmp_path, photo, big_photo):
    from compressai import models

    from taskcodec.codecs.loading import load_codec

    torch.manual_seed(0)
    # The whole fixed-rate zoo, each under one of the keys CompressAI's tools write. The
    # autoregressive ones are coded serially by CompressAI's own code on its side.
    for cls, sizes, name, key in (
            (models.ScaleHyperprior, {"M": 12}, "bmshj2018-hyperprior", "state_dict"),
            (models.MeanScaleHyperprior, {"M": 12}, "mbt2018-mean", "network"),
            (models.FactorizedPrior, {"M": 12}, "bmshj2018-factorized", None),
            (models.FactorizedPriorReLU, {"M": 12}, "bmshj2018-factorized-relu",
             "model_state_dict"),
            (models.JointAutoregressiveHierarchicalPriors, {"M": 12}, "mbt2018", "state_dict"),
            (models.Cheng2020Anchor, {}, "cheng2020-anchor", None),
            (models.Cheng2020Attention, {}, "cheng2020-attn", "network")):
        net = cls(N=8, **sizes).eval()
        net.update(force=True)
        path = tmp_path / f"{name}.pth.tar"
        # examples/train.py's layout (or a plain state dict)
        torch.save({"epoch": 3, key: net.state_dict(), "loss": 1.0} if key else net.state_dict(),
                   path)
        codec = load_codec(str(path))
        assert (codec.name, codec.model_args["N"], codec.model_args["M"]) == \
            (name, 8, sizes.get("M", 8))
        theirs = _compressai_inference(net, big_photo)
        _, payload_bpp, ours_psnr = _taskcodec_measure(codec, big_photo)
        assert theirs["bpp"] == pytest.approx(payload_bpp, abs=1e-9)
        assert theirs["psnr-rgb"] == pytest.approx(ours_psnr, abs=1e-4)

    out = tmp_path / "photo.tcd"
    ckpt = str(tmp_path / "mbt2018-mean.pth.tar")
    result = CliRunner().invoke(cli, ["compress", str(photo), "-o", str(out), "-c", ckpt,
                                      "--codec", "mbt2018-mean"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["decompress", str(out), "-o", str(tmp_path / "back.png"),
                                      "-c", ckpt])
    assert result.exit_code == 0, result.output
    assert read_png(tmp_path / "back.png").shape == (3, 85, 128)

    for args, says in ((["--codec", "bmshj2018-factorized"], "are not a bmshj2018-factorized"),
                       (["--codec", "nope"], "unknown codec 'nope'")):
        result = CliRunner().invoke(cli, ["compress", str(photo), "-o", str(out), "-c", ckpt,
                                          *args])
        assert result.exit_code == 2 and says in result.output, result.output


def test_a_compressai_zoo_name_is_read_from_the_torch_hub_cache_only(tmp_path, photo,
                                                                     monkeypatch):
    from compressai.models import ScaleHyperprior

    from taskcodec.codecs.loading import load_codec

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    out = tmp_path / "photo.tcd"
    ref = "compressai:bmshj2018-hyperprior:3"
    result = CliRunner().invoke(cli, ["compress", str(photo), "-o", str(out), "-c", ref])
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "bmshj2018-hyperprior-3-6d87be32.pth.tar"
    assert result.exit_code == 2 and str(expected) in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    # the zoo stores (N, M) = (128, 192) for quality 3: a file of that shape in the cache is used
    expected.parent.mkdir(parents=True)
    torch.save(ScaleHyperprior(N=128, M=192).state_dict(), expected)
    codec = load_codec(ref)
    assert (codec.name, codec.model_args["M"]) == ("bmshj2018-hyperprior", 192)
    bad = CliRunner().invoke(cli, ["compress", str(photo), "-o", str(out), "-c",
                                   "compressai:bmshj2018-hyperprior:x"])
    assert bad.exit_code == 2 and "not a CompressAI zoo model" in bad.output, bad.output


def test_the_zoos_context_models_are_read_by_name_and_one_without_weights_is_named(tmp_path,
                                                                                   monkeypatch):
    from compressai import models

    from taskcodec.checkpoints import zoo_path
    from taskcodec.codecs.loading import load_codec
    from taskcodec.errors import CheckpointError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for ref, net in (("compressai:mbt2018:2", models.JointAutoregressiveHierarchicalPriors(8, 8)),
                     ("compressai:cheng2020-anchor:6", models.Cheng2020Anchor(8)),
                     ("compressai:cheng2020-attn:1:ms-ssim", models.Cheng2020Attention(8))):
        path = zoo_path(ref)[1]
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), path)  # the zoo's files are plain state dicts
        assert load_codec(ref).name == ref.split(":")[1]
    for ref, says in (("compressai:bmshj2018-factorized-relu:3",
                       "CompressAI publishes no weights for bmshj2018-factorized-relu (train one: "
                       "taskcodec train --codec bmshj2018-factorized-relu)"),
                      ("compressai:cheng2020-anchor:7", "not a CompressAI zoo model")):
        with pytest.raises(CheckpointError) as err:
            load_codec(ref)
        assert says in str(err.value)


def test_the_zoos_variable_rate_models_are_read_by_name_without_quality(tmp_path, monkeypatch):
    from compressai.models.vbr import JointAutoregressiveHierarchicalPriorsVbr, ScaleHyperpriorVbr

    from taskcodec.checkpoints import zoo_path
    from taskcodec.codecs.loading import load_codec
    from taskcodec.errors import CheckpointError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    with pytest.raises(CheckpointError) as err:
        load_codec("compressai:bmshj2018-hyperprior-vbr")
    message = str(err.value)
    assert str(hub / "bmshj2018-hyperprior-mse-vbr-cddd26be.pth.tar") in message
    assert len(message.splitlines()) == 1
    for ref, says in (("compressai:mbt2018-vbr:3", "mbt2018-vbr has one weight file for all its "
                                                   "rates: no quality (write compressai:mbt2018-"
                                                   "vbr, and choose the rate point with --rate)"),
                      ("compressai:mbt2018-vbr:ms-ssim", "publishes mbt2018-vbr for mse only")):
        with pytest.raises(CheckpointError, match=re.escape(says)):
            zoo_path(ref)
    # A state dict the test writes where the zoo's file would be: loaded, and codes at a rate.
    hub.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(JointAutoregressiveHierarchicalPriorsVbr(8, 8).state_dict(),
               zoo_path("compressai:mbt2018-vbr:mse")[1])
    codec = load_codec("compressai:mbt2018-vbr")
    assert (codec.name, codec.model_args["N"], codec.default_rate) == ("mbt2018-vbr", 8, 7)
    x = torch.rand(1, 3, 32, 32)
    assert codec.decompress(codec.compress(x, 2))["x_hat"].shape == x.shape
    # CompressAI's published hyperprior-vbr weights carry a variable-rate hyper-latent
    # bottleneck (vr_entbttlnck=True): refused in one line, not "fits no codec".
    torch.save(ScaleHyperpriorVbr(8, 8, vr_entbttlnck=True).state_dict(),
               zoo_path("compressai:bmshj2018-hyperprior-vbr")[1])
    with pytest.raises(CheckpointError, match="vr_entbttlnck=True.*which taskcodec does not code$"):
        load_codec("compressai:bmshj2018-hyperprior-vbr")


def test_weights_that_fit_two_registered_codecs_ask_for_codec(tmp_path, monkeypatch):
    from compressai.models import FactorizedPrior

    from taskcodec.codecs import CODECS
    from taskcodec.codecs.loading import load_codec
    from taskcodec.errors import CheckpointError

    # No two zoo models share their weights' names and shapes; a twin registered here does.
    monkeypatch.setitem(CODECS._builders, "factorized-twin", CODECS.get("bmshj2018-factorized"))
    path = tmp_path / "weights.pth.tar"
    torch.save(FactorizedPrior(N=8, M=8).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"CompressAI weights that fit bmshj2018-factorized, "
                                              r"factorized-twin of the registered codecs; name it "
                                              r"with --codec$"):
        load_codec(str(path))
    assert load_codec(str(path), codec="factorized-twin").name == "factorized-twin"
