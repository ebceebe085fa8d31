"""The classical anchors (JPEG, WebP, AVIF through Pillow): the rate and quality they report are
those of their real files, each is run at the quality nearest the codec's rate, evaluate logs
them with their encoder settings, and ``compare --anchors`` draws them as curves."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from taskcodec import baselines
from taskcodec import compare as cmp
from taskcodec.cli.main import cli
from taskcodec.config import ANCHORS, EvalConfig, parse_anchors
from taskcodec.errors import ConfigError

# 48 px images keep every encode cheap; their MS-SSIM uses 2 scales and warns (metrics tests).
pytestmark = pytest.mark.filterwarnings("ignore:MS-SSIM on")
SIZE = (48, 40)  # width, height


def _pixels(seed: int = 0) -> np.ndarray:
    """An 8-bit RGB image with gradients, an edge and texture (H x W x 3)."""
    width, height = SIZE
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    disc = ((xx - 0.5) ** 2 + (yy - 0.4) ** 2 < 0.08).astype(float)
    base = np.stack([0.3 + 0.5 * xx, 0.6 * yy + 0.3 * disc, 0.5 + 0.3 * np.sin(8 * xx * yy)], -1)
    return np.clip((base + 0.15 * rng.random(base.shape)) * 255, 0, 255).round().astype(np.uint8)


def _tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels.astype(np.float32) / 255).permute(2, 0, 1).contiguous()


def _file(name: str, pixels: np.ndarray, quality: int) -> bytes:
    """The anchor's file straight from Pillow, with the settings taskcodec says it uses."""
    codec = baselines.ANCHOR_CODECS[name]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=codec.format, quality=quality, **codec.settings)
    return buffer.getvalue()


def _available(name: str):
    reason = baselines.unavailable(name)
    return pytest.param(name, marks=pytest.mark.skipif(bool(reason), reason=reason or "available"))


EVERY_ANCHOR = [_available(name) for name in ANCHORS]


@pytest.fixture(scope="module")
def rates() -> dict[str, dict[int, float]]:
    """Independent oracle: each anchor's real bpp at every quality it searches."""
    pixels = _pixels()
    return {name: {q: 8 * len(_file(name, pixels, q)) / (SIZE[0] * SIZE[1])
                   for q in codec.qualities}
            for name, codec in baselines.ANCHOR_CODECS.items() if not baselines.unavailable(name)}


def test_the_anchor_codecs_are_the_anchors_config_and_compare_know():
    assert list(baselines.ANCHOR_CODECS) == list(ANCHORS) == ["jpeg", "webp", "avif"]
    assert list(cmp.ANCHOR_CURVES.values()) == ["JPEG (Pillow)", "WebP (Pillow)", "AVIF (Pillow)"]


@pytest.mark.parametrize("name", EVERY_ANCHOR)
def test_an_anchor_reports_the_bytes_and_the_psnr_of_its_decoded_file(name):
    pixels = _pixels()
    point = baselines.anchor_at_bpp(name, _tensor(pixels), 1.5)
    data = _file(name, pixels, point["quality"])
    assert point["bpp"] == 8 * len(data) / (SIZE[0] * SIZE[1])
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.format == baselines.ANCHOR_CODECS[name].format
        assert decoded.size == SIZE
        back = np.asarray(decoded.convert("RGB"), dtype=np.float64)
    mse = np.mean((back - pixels.astype(np.float64)) ** 2) / 255**2
    assert mse > 0  # lossy: the PSNR below is of a real reconstruction, not of the original
    assert point["psnr"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-5)
    assert 0 < point["ms_ssim"] <= 1


@pytest.mark.parametrize("name", EVERY_ANCHOR)
def test_an_anchor_runs_at_the_quality_whose_bpp_is_nearest_the_target(name, rates):
    by_quality = rates[name]
    low, high = min(by_quality.values()), max(by_quality.values())
    image = _tensor(_pixels())
    for fraction in (0.15, 0.5):
        target = low + fraction * (high - low)
        point = baselines.anchor_at_bpp(name, image, target)
        assert point["bpp"] == by_quality[point["quality"]]
        nearest = min(abs(b - target) for b in by_quality.values())
        assert abs(point["bpp"] - target) == pytest.approx(nearest), (fraction, point)
    codec = baselines.ANCHOR_CODECS[name]
    assert baselines.anchor_at_bpp(name, image, low / 10)["quality"] == codec.qualities[0]
    assert baselines.anchor_at_bpp(name, image, high * 10)["quality"] == codec.qualities[-1]


def test_evaluate_logs_each_anchor_with_the_qualities_chosen_and_its_encoder_settings():
    from taskcodec.evaluate import anchor_reference

    pixels = [_pixels(0), _pixels(1)]
    bpps = [0.8, 2.0]
    present = [n for n in ANCHORS if not baselines.unavailable(n)]
    metrics, params = anchor_reference([_tensor(p) for p in pixels], bpps, tuple(present))
    assert set(metrics) == {f"{n}_{k}" for n in present for k in ("bpp", "psnr", "ms_ssim")}
    for name in present:
        # The means are those of the files at the qualities the params name, one per image.
        qualities = [int(q) for q in params[f"anchor_{name}_quality"].split(",")]
        files = [_file(name, p, q) for p, q in zip(pixels, qualities, strict=True)]
        rates = [8 * len(f) / (SIZE[0] * SIZE[1]) for f in files]
        assert metrics[f"{name}_bpp"] == pytest.approx(np.mean(rates))
        psnrs = []
        for p, f in zip(pixels, files):
            with Image.open(io.BytesIO(f)) as decoded:
                back = np.asarray(decoded.convert("RGB"), dtype=np.float64)
            psnrs.append(10 * math.log10(255**2 / np.mean((back - p) ** 2)))
        assert metrics[f"{name}_psnr"] == pytest.approx(np.mean(psnrs), rel=1e-5)
        assert params[f"anchor_{name}_encoder"].startswith("Pillow ")
    expected = {"jpeg": {"anchor_jpeg_subsampling": "4:2:0"},
                "webp": {"anchor_webp_method": "6", "anchor_webp_lossless": "false"},
                "avif": {"anchor_avif_speed": "6", "anchor_avif_subsampling": "4:2:0",
                         "anchor_avif_max_threads": "1"}}
    for name in present:
        assert expected[name].items() <= params.items()
    assert anchor_reference([_tensor(pixels[0])], [1.0], ()) == ({}, {})


def test_an_anchor_pillow_cannot_code_is_skipped_with_one_line_saying_why(monkeypatch, caplog):
    from taskcodec.evaluate import anchor_reference

    # A format this Pillow has no encoder for stands for AVIF on a Pillow built without it.
    broken = dataclasses.replace(baselines.ANCHOR_CODECS["avif"], format="NO-SUCH-FORMAT")
    monkeypatch.setitem(baselines.ANCHOR_CODECS, "avif", broken)
    baselines.unavailable.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="taskcodec.evaluate"):
            metrics, params = anchor_reference([_tensor(_pixels())], [1.0], ("jpeg", "avif"))
    finally:
        baselines.unavailable.cache_clear()
    assert "jpeg_bpp" in metrics and not any(k.startswith("avif_") for k in metrics)
    assert params["anchor_avif"].startswith("unavailable: Pillow ")
    assert "NO-SUCH-FORMAT" in params["anchor_avif"]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("AVIF anchor skipped: ") and "\n" not in warning


def test_anchor_names_are_checked_in_one_line_naming_the_bad_one():
    assert parse_anchors(" JPEG, webp,jpeg ", "x") == ("jpeg", "webp")
    assert parse_anchors("none", "x") == parse_anchors("", "x") == ()
    with pytest.raises(ConfigError, match=r"^anchors='jpeg,png': 'png' is not an anchor \(choose "
                                          r"from jpeg, webp, avif, or none\)$"):
        EvalConfig.from_dict({"checkpoint": "a.pt", "anchors": "jpeg,png"})
    assert EvalConfig.from_dict({"checkpoint": "a.pt", "anchors": "AVIF, jpeg"}).anchors == "avif,jpeg"
    with pytest.raises(ConfigError, match=r"^--anchors 'webp,heic': 'heic' is not an anchor"):
        cmp.CompareOptions(anchors="webp,heic")
    for argv in (["compare", "--anchors", "jpeg,jpeg2000"],
                 ["evaluate", "--checkpoint", "a.pt", "--anchors", "jpeg2000"]):
        result = CliRunner().invoke(cli, argv)
        assert result.exit_code == 2, result.output
        (line,) = result.output.strip().splitlines()
        assert line.startswith("Error: ") and "'jpeg2000' is not an anchor" in line, line


def _run(rate: float, psnr: float, anchors=("jpeg", "webp", "avif")):
    """An evaluate run as MLflow returns it, with each anchor 1-3 dB below the codec."""
    from mlflow.entities import Metric, Run, RunData, RunInfo, RunTag

    metrics = {"bpp": rate, "psnr": psnr, "ms_ssim": 0.9}
    for i, name in enumerate(anchors):
        metrics |= {f"{name}_bpp": rate * 1.01, f"{name}_psnr": psnr - 3 + i,
                    f"{name}_ms_ssim": 0.85}
    run_id = f"{int(rate * 1000):032x}"
    info = RunInfo(run_id=run_id, experiment_id="0", user_id="u", status="FINISHED",
                   start_time=0, end_time=1, lifecycle_stage="active", artifact_uri="")
    data = RunData(metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
                   tags=[RunTag("method", "ours")])
    return Run(info, data)


def test_compare_draws_a_curve_per_anchor_into_its_points_files(tmp_path, caplog):
    runs = [_run(r, p) for r, p in zip((0.1, 0.2, 0.4, 0.8), (26.0, 29.0, 32.0, 35.0))]
    options = cmp.CompareOptions(anchors=("webp", "avif"), jpeg=True)
    curves = cmp.build_curves(runs, options)
    assert [(c.name, c.source, len(c.points)) for c in curves] == [
        ("ours", "runs", 4), ("JPEG (Pillow)", "jpeg", 4), ("WebP (Pillow)", "webp", 4),
        ("AVIF (Pillow)", "avif", 4)]
    assert cmp.pick_anchor(curves, None).name == "JPEG (Pillow)"
    cmp.write_points(curves, tmp_path)
    with open(tmp_path / "points.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    avif = [r for r in rows if r["curve"] == "AVIF (Pillow)"]
    assert [(float(r["bpp"]), float(r["psnr"])) for r in avif] == [
        (r * 1.01, p - 1) for r, p in zip((0.1, 0.2, 0.4, 0.8), (26.0, 29.0, 32.0, 35.0))]
    doc = json.loads((tmp_path / "points.json").read_text())
    assert [c["source"] for c in doc["curves"]] == ["runs", "jpeg", "webp", "avif"]
    # Runs evaluated without AVIF: the other anchors are drawn, AVIF's absence is one warning.
    without = [_run(r, 30.0, ("jpeg", "webp")) for r in (0.1, 0.2)]
    with caplog.at_level(logging.WARNING):
        names = [c.name for c in cmp.build_curves(without, options)]
    assert names == ["ours", "JPEG (Pillow)", "WebP (Pillow)"]
    assert any("avif_bpp" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match=r"--anchors avif: none of the selected runs logged "
                                          r"avif_bpp"):
        cmp.build_curves(without, cmp.CompareOptions(anchors="avif"))


def test_evaluate_then_compare_anchors_end_to_end(tmp_path, monkeypatch):
    """A tiny (untrained) codec evaluated on one image, then ``compare --anchors``: the
    anchors' points in points.csv are the metrics the evaluate run logged."""
    from mlflow.tracking import MlflowClient

    from taskcodec.codecs import build_codec
    from taskcodec.evaluate import evaluate

    monkeypatch.chdir(tmp_path)
    model = build_codec("bmshj2018-factorized", N=8, M=8)
    args = {"kind": "codec", "codec": "bmshj2018-factorized", "N": 8, "M": 8}
    torch.save({"model": model.state_dict(), "config": {**args, "lmbda": 0.01},
                "model_args": args}, tmp_path / "tiny.pt")
    data = tmp_path / "images"
    data.mkdir()
    Image.fromarray(_pixels()).save(data / "im.png")
    present = [n for n in ANCHORS if not baselines.unavailable(n)]
    result = evaluate(EvalConfig.from_dict({"checkpoint": str(tmp_path / "tiny.pt"),
                                            "data": str(data), "anchors": ",".join(present)}))
    run = MlflowClient().get_run(result["run_id"])
    assert {f"anchor_{n}_quality" for n in present} <= set(run.data.params)
    assert run.data.params.get("anchor_webp_method", "6") == "6"

    out = tmp_path / "rd"
    done = CliRunner().invoke(cli, ["compare", "--run-id", result["run_id"], "--anchors",
                                    ",".join(present), "--output-dir", str(out)])
    assert done.exit_code == 0, done.output
    with open(out / "points.csv", newline="") as fh:
        rows = {r["curve"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {result["codec"], *(cmp.ANCHOR_CURVES[n] for n in present)}
    for name in present:
        row = rows[cmp.ANCHOR_CURVES[name]]
        assert row["source"] == name
        assert float(row["bpp"]) == pytest.approx(run.data.metrics[f"{name}_bpp"])
        assert float(row["psnr"]) == pytest.approx(run.data.metrics[f"{name}_psnr"])
