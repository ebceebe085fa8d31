"""RD comparisons: BD deltas on hand-checkable curves, grouping, references, and ``taskcodec
compare`` against a real MLflow server (evaluate-like runs logged directly, and one test that
trains and evaluates tiny real codecs)."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.entities import Metric, Param, Run, RunData, RunInfo, RunTag
from PIL import Image

from taskcodec import compare as cmp
from taskcodec import ideal_gain
from taskcodec.cli.main import cli
from taskcodec.errors import ConfigError, DataError

RATES = [0.1, 0.2, 0.4, 0.8]
PSNRS = [26.0, 29.0, 32.0, 35.0]  # 3 dB per doubling of the rate: linear in log-rate


def curve(name: str, rates, values, metric: str = "psnr", source: str = "runs") -> cmp.Curve:
    return cmp.make_curve(name, [cmp.Point(r, {metric: v}) for r, v in zip(rates, values)], source)


# -- BD deltas ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", cmp.BD_METHODS)
def test_identical_curves_differ_by_nothing(method):
    a, b = curve("a", RATES, PSNRS), curve("b", RATES, PSNRS)
    assert cmp.bd_rate(a, b, "psnr", method) == pytest.approx(0.0, abs=1e-9)
    assert cmp.bd_metric(a, b, "psnr", method) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("method", cmp.BD_METHODS)
def test_half_the_rate_at_every_quality_is_minus_50_percent(method):
    anchor = curve("anchor", RATES, PSNRS)
    half = curve("half", [r / 2 for r in RATES], PSNRS)
    assert cmp.bd_rate(anchor, half, "psnr", method) == pytest.approx(-50.0, abs=1e-6)
    assert cmp.bd_rate(half, anchor, "psnr", method) == pytest.approx(100.0, abs=1e-6)
    # Half the rate is one doubling earlier: 3 dB better at equal rate on this curve.
    assert cmp.bd_metric(anchor, half, "psnr", method) == pytest.approx(3.0, abs=1e-6)


def test_a_constant_quality_gain_is_the_bd_metric_and_curves_may_differ_in_size():
    anchor = curve("anchor", RATES, PSNRS)
    better = curve("better", [0.1, 0.15, 0.2, 0.4, 0.8], [27.0, 27.0 + 3 * math.log2(1.5), 30.0,
                                                         33.0, 36.0])
    assert cmp.bd_metric(anchor, better, "psnr") == pytest.approx(1.0, abs=1e-6)
    # 1 dB at 3 dB per doubling is a rate factor of 2^(-1/3).
    assert cmp.bd_rate(anchor, better, "psnr") == pytest.approx((2 ** (-1 / 3) - 1) * 100, abs=1e-6)


def test_lower_is_better_metrics_are_turned_around():
    errors = [0.20, 0.15, 0.10, 0.05]
    anchor = curve("anchor", RATES, errors, "abs_rel")
    half = curve("half", [r / 2 for r in RATES], errors, "abs_rel")
    assert cmp.lower_is_better("abs_rel") and not cmp.lower_is_better("psnr")
    assert cmp.bd_rate(anchor, half, "abs_rel") == pytest.approx(-50.0, abs=1e-6)
    lower = curve("lower", RATES, [e - 0.01 for e in errors], "abs_rel")
    assert cmp.bd_metric(anchor, lower, "abs_rel") == pytest.approx(-0.01, abs=1e-9)


def test_fewer_than_four_points_is_one_clear_error():
    anchor = curve("anchor", RATES, PSNRS)
    short = curve("short-one", RATES[:3], PSNRS[:3])
    for func in (cmp.bd_rate, cmp.bd_metric):
        with pytest.raises(ConfigError) as err:
            func(anchor, short, "psnr")
        message = str(err.value)
        assert "\n" not in message
        assert "'short-one' has 3 psnr point(s)" in message and "at least 4" in message


def test_curves_that_do_not_overlap_are_one_clear_error():
    low = curve("low", RATES, PSNRS)
    high = curve("high", [r * 10 for r in RATES], [p + 20 for p in PSNRS])
    with pytest.raises(ConfigError, match=r"'high' \(46-55 dB\) and 'low' \(26-35 dB\) do not "
                                          r"overlap in psnr"):
        cmp.bd_rate(low, high, "psnr")
    with pytest.raises(ConfigError, match=r"do not overlap in rate"):
        cmp.bd_metric(low, high, "psnr")


def test_quality_that_falls_with_rate_is_refused_for_bd_rate_only():
    anchor = curve("anchor", RATES, PSNRS)
    bumpy = curve("bumpy", RATES, [27.0, 30.0, 29.5, 34.0])
    with pytest.raises(ConfigError, match=r"'bumpy': psnr does not improve from 0.2 to 0.4 bpp"):
        cmp.bd_rate(anchor, bumpy, "psnr")
    assert math.isfinite(cmp.bd_metric(anchor, bumpy, "psnr"))


def test_unknown_bd_method_is_refused():
    with pytest.raises(ConfigError, match="'akimbo' is not one of: pchip, cubic"):
        cmp.bd_rate(curve("a", RATES, PSNRS), curve("b", RATES, PSNRS), "psnr", "akimbo")


def test_bd_table_reports_why_a_value_is_missing_instead_of_failing():
    anchor = curve("anchor", RATES, PSNRS)
    rows = cmp.bd_table([anchor, curve("two", RATES[:2], PSNRS[:2]),
                         curve("half", [r / 2 for r in RATES], PSNRS)], anchor, ["psnr"])
    assert [r.curve for r in rows] == ["two", "half"]
    assert rows[0].bd_rate is None and "has 2 psnr point(s)" in rows[0].bd_rate_error
    assert rows[1].bd_rate == pytest.approx(-50.0) and not rows[1].reason
    text = cmp.format_bd(rows, "anchor", "pchip")
    assert re.search(r"half\s+psnr\s+-50.00 %\s+\+3 dB", text)
    assert re.search(r"two\s+psnr\s+n/a\s+n/a\s+\(curve 'two' has 2 psnr point", text)


# -- runs into curves --------------------------------------------------------------------------
def fake_run(metrics: dict, params: dict | None = None, tags: dict | None = None,
             name: str = "") -> Run:
    """A real MLflow ``Run`` entity, as a search returns it (no store needed)."""
    run_id = uuid.uuid4().hex
    info = RunInfo(run_id=run_id, experiment_id="0", user_id="u", status="FINISHED",
                   start_time=0, end_time=1, lifecycle_stage="active", artifact_uri="",
                   run_name=name or run_id[:6])
    data = RunData(metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
                   params=[Param(k, str(v)) for k, v in (params or {}).items()],
                   tags=[RunTag(k, v) for k, v in (tags or {}).items()])
    return Run(info, data)


def evaluate_metrics(bpp: float, psnr: float, ms_ssim: float = 0.9) -> dict:
    """The metrics evaluate logs for one run."""
    jpeg_bpp = bpp * 1.02  # JPEG quality depends on its rate only: 3 dB worse than PSNRS
    return {"bpp": bpp, "bpp_estimated": bpp * 0.97, "psnr": psnr, "ms_ssim": ms_ssim,
            "encode_time": 0.1, "decode_time": 0.2, "jpeg_bpp": jpeg_bpp,
            "jpeg_psnr": 23 + 3 * math.log2(jpeg_bpp / 0.1), "jpeg_ms_ssim": 0.8 + jpeg_bpp / 10}


@pytest.mark.parametrize("method", cmp.BD_METHODS)
def test_paper1_ratio_is_the_share_of_the_upper_baselines_gain(method):
    """Upper needs half the lower baseline's rate (-50 %, +3 dB on 3 dB per doubling);
    "cond" needs 3/4 of it (-25 %, +3*log2(4/3) dB): half the ideal BD-rate gain, and
    log2(4/3) = 0.415 of the ideal BD-PSNR gain. A second base's group stays apart."""
    curves = [curve("lower/0.0", RATES, PSNRS), curve("upper/0.0", [r / 2 for r in RATES], PSNRS),
              curve("cond/0.0", [r * 0.75 for r in RATES], PSNRS),
              curve("lower/20.0", RATES, PSNRS), curve("cond/20.0", RATES, PSNRS),
              curve("JPEG", RATES, PSNRS, source="jpeg"), curve("base/0.0", RATES, PSNRS, "map")]
    (group,) = ideal_gain.baseline_groups(curves)
    assert (group[0].name, group[1].name, [c.name for c in group[2]]) == (
        "lower/0.0", "upper/0.0", ["cond/0.0", "base/0.0"])  # lower/20.0 has no upper
    (row,) = ideal_gain.ideal_gain_ratios(curves, ["psnr"], method)  # base/0.0 has no psnr
    assert (row.curve, row.lower, row.upper, row.error) == ("cond/0.0", "lower/0.0", "upper/0.0",
                                                           "")
    assert row.bd_rate == pytest.approx(-25.0, abs=1e-6)
    assert row.bd_rate_upper == pytest.approx(-50.0, abs=1e-6)
    assert row.ratio_rate == pytest.approx(0.5, abs=1e-6)
    assert row.bd_metric_upper == pytest.approx(3.0, abs=1e-6)
    assert row.ratio_metric == pytest.approx(math.log2(4 / 3), abs=1e-6)
    assert "0.500" in ideal_gain.format_ratios([row]) and "0.415" in ideal_gain.markdown_ratios([row])
    # a curve BD cannot be computed for keeps its row, with the reason
    short = ideal_gain.ideal_gain_ratios([*curves[:2], curve("cond/0.0", RATES[:3], PSNRS[:3])],
                                  ["psnr"], method)
    assert short[0].ratio_rate is None and "at least 4" in short[0].error


def test_rate_axis_is_chosen_among_the_logged_rates():
    runs = [fake_run({**evaluate_metrics(0.4, 32), "bpp_enh": 0.1}, tags={"method": "a"}),
            fake_run(evaluate_metrics(0.2, 29), tags={"method": "b"})]
    (a,) = cmp.curves_from_runs(runs, "method", rate="bpp_enh")  # b logged no bpp_enh
    assert a.name == "a" and [p.bpp for p in a.points] == [0.1]
    assert "bpp_enh" not in a.points[0].metrics and "bpp" not in a.points[0].metrics
    estimated = cmp.curves_from_runs(runs, "method", rate="bpp_estimated")
    assert [p.bpp for c in estimated for p in c.points] == pytest.approx([0.4 * 0.97, 0.2 * 0.97])
    for bad in ("psnr", "bpp enh", ""):
        with pytest.raises(ConfigError, match="is not a rate metric"):
            cmp.CompareOptions(rate=bad)


def test_runs_are_grouped_by_tag_or_param_and_ordered_by_rate():
    runs = [fake_run(evaluate_metrics(0.4, 32), {"lmbda": 0.0067}, {"method": "b"}),
            fake_run(evaluate_metrics(0.1, 26), {"lmbda": 0.0018}, {"method": "b"}),
            fake_run(evaluate_metrics(0.2, 29), {"lmbda": 0.0035, "method": "a"}),
            fake_run({"val_bpp": 0.3, "val_psnr": 20}, {"lmbda": 0.1}, {"method": "a"}),
            fake_run(evaluate_metrics(0.3, 30), {"lmbda": 0.01})]
    curves = cmp.curves_from_runs(runs, "method")
    assert [(c.name, [p.bpp for p in c.points]) for c in curves] == [
        ("(no method)", [0.3]), ("a", [0.2]), ("b", [0.1, 0.4])]  # the training run is left out
    b = curves[2]
    assert [p.label for p in b.points] == ["λ=0.0018", "λ=0.0067"]
    assert [p.run_id for p in b.points] == [runs[1].info.run_id, runs[0].info.run_id]
    assert set(b.points[0].metrics) == {"psnr", "ms_ssim"}  # no rates, timings or JPEG
    by_two = cmp.curves_from_runs(runs[:2], "method,lmbda")
    assert [c.name for c in by_two] == ["b/0.0018", "b/0.0067"]
    assert cmp.shared_metrics(curves) == ["psnr", "ms_ssim"]



def test_scalable_points_are_labelled_by_alpha_and_others_by_run_name():
    runs = [fake_run(evaluate_metrics(0.5, 30), tags={"method": "conditional", "alpha": "64.0"}),
            fake_run(evaluate_metrics(0.3, 27), {"alpha": "0.5"}, {"method": "conditional"}),
            fake_run(evaluate_metrics(0.4, 28), tags={"method": "conditional"}, name="eval-x")]
    (curve,) = cmp.curves_from_runs(runs, "method")
    assert [p.label for p in curve.points] == ["α=0.5", "eval-x", "α=64"]

def test_jpeg_points_of_the_runs_make_one_reference_curve():
    runs = [fake_run(evaluate_metrics(b, p), tags={"method": "m"}) for b, p in zip(RATES, PSNRS)]
    again = fake_run(evaluate_metrics(0.4, 31.0), tags={"method": "other"})  # same JPEG point
    jpeg = cmp.jpeg_curve([*reversed(runs), again])
    assert jpeg.source == "jpeg" and jpeg.name == cmp.JPEG_CURVE
    assert [p.bpp for p in jpeg.points] == [b * 1.02 for b in RATES]
    assert [p.metrics["psnr"] for p in jpeg.points] == pytest.approx([p - 3 + 3 * math.log2(1.02)
                                                                      for p in PSNRS])
    assert [p.label for p in jpeg.points] == ["JPEG", "JPEG", "JPEG (2 runs)", "JPEG"]
    assert cmp.pick_anchor([*cmp.curves_from_runs(runs), jpeg], "jpeg") is jpeg
    assert cmp.pick_anchor([*cmp.curves_from_runs(runs), jpeg], None) is jpeg
    with pytest.raises(ConfigError, match=r"--anchor 'nope' is not one of the curves: 'm', 'JPEG"):
        cmp.pick_anchor([*cmp.curves_from_runs(runs), jpeg], "nope")


def test_runs_on_different_data_sets_never_share_a_curve_unless_mixed_on_purpose():
    kodak = {"data_name": "kodak", "data_digest": "1a2b3c4d5e6f7a8b"}
    embedded = {"data_name": "embedded", "data_digest": "99aa00bb11cc22dd"}
    runs = [fake_run(evaluate_metrics(b, p), tags={"method": "hyper", **data})
            for data in (kodak, embedded) for b, p in zip(RATES, PSNRS)]
    curves = cmp.curves_from_runs(runs, "method")
    assert [(c.name, len(c.points)) for c in curves] == [
        ("hyper @ embedded#99aa00bb", 4), ("hyper @ kodak#1a2b3c4d", 4)]
    mixed = cmp.curves_from_runs(runs, "method", mix_data=True)
    assert [(c.name, len(c.points)) for c in mixed] == [("hyper", 8)]
    # One data set (or runs from before digests were logged): names stay as they were.
    assert [c.name for c in cmp.curves_from_runs(runs[:4], "method")] == ["hyper"]
    options = cmp.CompareOptions(jpeg=True)
    assert [c.name for c in cmp.build_curves(runs, options)] == [
        "hyper @ embedded#99aa00bb", "hyper @ kodak#1a2b3c4d", "JPEG (Pillow) @ embedded#99aa00bb",
        "JPEG (Pillow) @ kodak#1a2b3c4d"]
    old = fake_run(evaluate_metrics(0.3, 30), tags={"method": "hyper"})
    assert cmp.data_sets([runs[0], old]) == ["kodak#1a2b3c4d", "unknown data"]


def test_metric_kinds():
    assert [m for m in evaluate_metrics(0.1, 30) if cmp.is_quality_metric(m)] == ["psnr", "ms_ssim"]
    assert all(cmp.is_quality_metric(m) for m in ("map", "miou", "abs_rel", "accuracy"))
    assert cmp.metric_label("psnr") == "PSNR (dB)"
    assert cmp.metric_label("abs_rel") == "AbsRel, lower is better"


# -- reference curves --------------------------------------------------------------------------
def test_compressai_results_json_becomes_a_reference_curve(tmp_path):
    path = tmp_path / "jpeg.json"
    path.write_text(json.dumps({"name": "JPEG", "description": "Pillow", "results": {
        "psnr-rgb": [24.0, 27.0, 30.0, 33.0], "ms-ssim-rgb": [0.8, 0.89, 0.92, 0.94],
        "bpp": [0.4, 0.2, 0.8, 1.6], "encoding_time": [0.01] * 4}}))
    ref = cmp.load_reference(path)
    assert ref.name == "JPEG" and ref.source == "reference"
    assert [p.bpp for p in ref.points] == [0.2, 0.4, 0.8, 1.6]
    assert ref.points[0].metrics == {"psnr": 27.0, "ms_ssim": 0.89}

    unnamed = tmp_path / "paper-bmshj2018.json"
    unnamed.write_text(json.dumps({"results": {"psnr": [30.0], "bpp": [0.5]}}))
    assert cmp.load_reference(unnamed).name == "paper-bmshj2018"


def test_csv_reference_with_bpp_and_metric_columns(tmp_path):
    path = tmp_path / "vtm.csv"
    path.write_text("bpp,PSNR,MS-SSIM,mAP\n0.5,31.5,0.95,\n0.25,29.0,0.93,0.41\n")
    ref = cmp.load_reference(path)
    assert ref.name == "vtm"
    assert [(p.bpp, p.metrics) for p in ref.points] == [
        (0.25, {"psnr": 29.0, "ms_ssim": 0.93, "map": 0.41}), (0.5, {"psnr": 31.5, "ms_ssim": 0.95})]


@pytest.mark.parametrize("name, text, message", [
    ("a.json", '{"results": {"psnr": [1, 2], "bpp": [0.1]}}', "lists of different lengths"),
    ("b.json", "{not json", "is not valid JSON"),
    ("c.csv", "rate,psnr\n0.1,30\n", "has no bpp column (has: rate, psnr)"),
    ("d.csv", "bpp,psnr\n0.1,thirty\n", "psnr[0]: 'thirty' is not a number"),
    ("e.txt", "bpp\n0.1\n", "expected a .json (CompressAI results) or .csv file"),
])
def test_bad_reference_files_name_the_file(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError) as err:
        cmp.load_reference(path)
    assert str(path) in str(err.value) and message in str(err.value)
    with pytest.raises(DataError, match="missing.json does not exist"):
        cmp.load_reference(tmp_path / "missing.json")


def test_run_ids_tag_is_cut_to_the_tag_limit_and_says_how_many_are_left_out():
    ids = [uuid.uuid4().hex for _ in range(200)]
    assert cmp.run_ids_tag(ids[:3]) == ",".join(ids[:3])
    tag = cmp.run_ids_tag(ids)
    assert len(tag) <= cmp.MAX_TAG_CHARS
    kept = tag.split(",")[:-1]
    assert kept == ids[:len(kept)] and len(kept) > 100
    assert tag.endswith(f"...(+{200 - len(kept)} more; see compared_runs.json)")


def test_plot_has_labelled_axes_legend_and_both_formats(tmp_path):
    curves = [curve("anchor", RATES, PSNRS), curve("ref", RATES, PSNRS, source="reference")]
    png, svg = cmp.plot_rd(curves, "psnr", tmp_path / "rd_psnr")
    with Image.open(png) as img:
        img.verify()
        assert img.format == "PNG" and img.size[0] > 300
    text = svg.read_text()
    for label in ("Rate (bpp, bits per pixel)", "PSNR (dB)", "anchor (4)", "ref (4)"):
        assert label in text


# -- taskcodec compare against a real MLflow server -------------------------------------------
def log_eval_run(client, experiment_id: str, method: str, lmbda: float, metrics: dict,
                 tags: dict | None = None) -> str:
    run = client.create_run(experiment_id, run_name=f"eval-{method}-{lmbda}",
                            tags={"method": method, "codec": method, "entry_point": "evaluate",
                                  **(tags or {})})
    run_id = run.info.run_id
    client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
                     params=[Param("lmbda", str(lmbda)), Param("codec", method)])
    client.set_terminated(run_id)
    return run_id


@pytest.fixture
def experiment(mlflow_server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    name = f"cmp-{uuid.uuid4().hex[:8]}"
    return client, name, client.create_experiment(name)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.server
def test_compare_command_logs_a_comparison_run(experiment, tmp_path):
    client, name, exp_id = experiment
    ids = {}
    for i, (rate, psnr) in enumerate(zip(RATES, PSNRS)):
        lmbda, ms_ssim = [0.0018, 0.0035, 0.0067, 0.013][i], 0.9 + 0.02 * i
        ids[("anchor", i)] = log_eval_run(client, exp_id, "anchor", lmbda,
                                          evaluate_metrics(rate, psnr, ms_ssim))
        ids[("half", i)] = log_eval_run(client, exp_id, "half", lmbda,
                                        evaluate_metrics(rate / 2, psnr, ms_ssim))
    # Neither a training run nor a stray run without the evaluate tag joins the comparison.
    stray = client.create_run(exp_id, tags={"method": "half"}).info.run_id
    client.log_metric(stray, "bpp", 0.05)
    client.log_metric(stray, "psnr", 40.0)
    client.log_metric(stray, "ms_ssim", 0.99)

    out = tmp_path / "out"
    out.mkdir()
    (out / "unrelated.txt").write_text("not part of the comparison")
    result = CliRunner().invoke(cli, ["compare", "--experiment", name, "--anchor", "anchor",
                                      "--output-dir", str(out), "--run-name", "rd-test"])
    assert result.exit_code == 0, result.output
    assert re.search(r"half\s+psnr\s+-50.00 %\s+\+3 dB", result.output)
    run_id = re.search(r"MLflow run: ([0-9a-f]{32})", result.output).group(1)

    run = client.get_run(run_id)
    assert run.info.run_name == "rd-test" and run.info.experiment_id == exp_id
    assert run.data.tags["comparison"] == "true" and run.data.tags["entry_point"] == "compare"
    assert set(run.data.tags["compared_run_ids"].split(",")) == set(ids.values())
    assert "| half | psnr | -50.00 % | +3 |" in run.data.tags["mlflow.note.content"]
    assert run.data.params["group_by"] == "method" and run.data.params["anchor"] == "anchor"
    logged = {Path(f.path).name for f in client.list_artifacts(run_id, "comparison")}
    assert {"rd_psnr.png", "rd_psnr.svg", "rd_ms_ssim.png", "points.csv", "points.json",
            "bd.csv", "bd.json", "compared_runs.json"} <= logged
    assert "unrelated.txt" not in logged

    points = read_csv(out / "points.csv")
    assert len(points) == 8 and stray not in {p["run_id"] for p in points}
    half = [p for p in points if p["curve"] == "half"]
    assert [float(p["bpp"]) for p in half] == [r / 2 for r in RATES]  # ordered by rate
    bd = json.loads((out / "bd.json").read_text())
    assert bd["anchor"] == "anchor" and bd["method"] == "pchip"
    assert {(r["metric"], round(r["bd_rate"], 6)) for r in bd["rows"]} == {("psnr", -50.0),
                                                                          ("ms_ssim", -50.0)}
    assert json.loads((out / "compared_runs.json").read_text())["run_ids"] == sorted(ids.values())

    # An earlier comparison run is never compared again.
    again = CliRunner().invoke(cli, ["compare", "--experiment", name, "--jpeg", "--anchor",
                                     "JPEG", "--bd-method", "cubic", "--metric", "psnr"])
    assert again.exit_code == 0, again.output
    again_id = re.search(r"MLflow run: ([0-9a-f]{32})", again.output).group(1)
    again_run = client.get_run(again_id)
    assert run_id not in again_run.data.tags["compared_run_ids"]
    bd_path = client.download_artifacts(again_id, "comparison/bd.json", str(tmp_path / "again"))
    again_bd = {(r["curve"], r["metric"]): r for r in json.loads(Path(bd_path).read_text())["rows"]}
    # JPEG needs twice the anchor's rate for the same PSNR, four times that of "half".
    assert again_bd[("anchor", "psnr")]["bd_rate"] == pytest.approx(-50.0, abs=1e-6)
    assert again_bd[("half", "psnr")]["bd_rate"] == pytest.approx(-75.0, abs=1e-6)
    assert again_bd[("anchor", "psnr")]["bd_metric"] == pytest.approx(3.0, abs=1e-6)
    assert again_run.data.params["bd_method"] == "cubic"


@pytest.mark.server
def test_selection_by_tag_run_id_and_filter(experiment):
    client, name, exp_id = experiment
    a = [log_eval_run(client, exp_id, "a", i, evaluate_metrics(r, p), {"data": "kodak"})
         for i, (r, p) in enumerate(zip(RATES, PSNRS))]
    b = [log_eval_run(client, exp_id, "b", i, evaluate_metrics(r, p + 1), {"data": "clic"})
         for i, (r, p) in enumerate(zip(RATES, PSNRS))]
    by_tag = cmp.select_runs(client, experiment_ids=[exp_id], tags={"data": "kodak"})
    assert {r.info.run_id for r in by_tag} == set(a)
    by_filter = cmp.select_runs(client, experiment_ids=[exp_id],
                                filter_string="tags.method = 'b' and metrics.bpp > 0.15")
    assert {r.info.run_id for r in by_filter} == set(b[1:])
    by_id = cmp.select_runs(client, run_ids=[a[0], b[0]], tags={"data": "clic"})
    assert [r.info.run_id for r in by_id] == [b[0]]
    with pytest.raises(ConfigError, match="MLflow search .*failed"):
        cmp.select_runs(client, experiment_ids=[exp_id], filter_string="bogus ==")


@pytest.mark.server
def test_compare_errors_are_one_line(experiment):
    client, name, exp_id = experiment
    result = CliRunner().invoke(cli, ["compare", "--experiment", name])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "no run with a bpp metric" in result.output
    result = CliRunner().invoke(cli, ["compare", "--experiment", "no-such-experiment-xyz"])
    assert result.exit_code == 2
    assert "Error: no experiment 'no-such-experiment-xyz'" in result.output
    log_eval_run(client, exp_id, "a", 0.01, evaluate_metrics(0.2, 30))
    result = CliRunner().invoke(cli, ["compare", "--experiment", name, "--metric", "miou"])
    assert result.exit_code == 2 and "--metric miou: not logged" in result.output
    result = CliRunner().invoke(cli, ["compare", "--experiment", name, "--tag", "oops"])
    assert result.exit_code == 2 and "'oops' is not NAME=VALUE" in result.output


@pytest.mark.server
def test_compare_pairs_replicates_logged_in_a_tracking_store(experiment, tmp_path):
    """5 seeds; per seed, "half" uses exactly half the anchor's rate: -50 %, zero-width."""
    client, name, exp_id = experiment
    for seed in range(5):
        for i, (rate, psnr) in enumerate(zip(RATES, PSNRS)):
            for method, factor in (("anchor", 1.0), ("half", 0.5)):
                log_eval_run(client, exp_id, method, LAMBDAS[i],
                             evaluate_metrics(rate * factor * (1 + 0.1 * seed), psnr),
                             {"seed": str(seed)})
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["compare", "--experiment", name, "--anchor", "anchor",
                                      "--pair-by", "seed", "--metric", "psnr",
                                      "--equivalence-margin", "1", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert "Paired by seed" in result.output
    paired = {r["quantity"]: r for r in json.loads((out / "paired.json").read_text())["rows"]}
    bd = paired["bd_rate"]
    assert bd["seeds"] == 5 and bd["mean"] == pytest.approx(-50.0, abs=1e-6)
    assert (bd["t_low"], bd["t_high"]) == pytest.approx((-50.0, -50.0), abs=1e-6)
    points = read_csv(out / "points.csv")
    assert len(points) == 8 and {p["replicates"] for p in points} == {"5"}
    assert float(points[0]["psnr_ci_low"]) == pytest.approx(float(points[0]["psnr"]))
    assert float(points[0]["bpp_ci_low"]) < float(points[0]["bpp"]) < float(
        points[0]["bpp_ci_high"])  # the seeds move the rate: an interval on the x axis
    run = client.get_run(re.search(r"MLflow run: ([0-9a-f]{32})", result.output).group(1))
    assert run.data.params["pair_by"] == "seed"
    assert "**Paired by seed**" in run.data.tags["mlflow.note.content"]


@pytest.mark.server
def test_published_curves_compare_alone_even_in_a_new_experiment(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    for name, rates in (("a", RATES), ("b", [r / 2 for r in RATES])):
        (tmp_path / f"{name}.json").write_text(json.dumps(
            {"name": name, "results": {"bpp": rates, "psnr-rgb": PSNRS}}))
    new = f"refs-{uuid.uuid4().hex[:8]}"
    result = CliRunner().invoke(cli, ["compare", "--experiment", new,
                                      "--reference", str(tmp_path / "a.json"),
                                      "--reference", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    assert re.search(r"b\s+psnr\s+-50.00 %", result.output)
    run = MlflowClient(mlflow_server.uri).get_run(
        re.search(r"MLflow run: ([0-9a-f]{32})", result.output).group(1))
    assert run.data.tags["comparison"] == "true" and run.data.params["references"] == "a.json,b.json"


def taskcodec(*args: str, cwd: Path) -> str:
    """Run the installed ``taskcodec`` command; its last stdout line (a run id)."""
    exe = Path(sys.executable).parent / "taskcodec"
    done = subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"taskcodec {' '.join(args)}:\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow  # trains and evaluates four tiny codecs (about 90 s on 2 CPU cores)
@pytest.mark.server
def test_end_to_end_train_evaluate_compare(mlflow_server, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    name = f"e2e-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name)
    client = MlflowClient(mlflow_server.uri)
    evaluated = {}
    for codec in ("bmshj2018-factorized", "bmshj2018-hyperprior"):
        for lmbda in ("0.0035", "0.05"):
            # 64: the hyperprior downsamples 64 times, smaller crops do not fit its hyper-latent.
            out = taskcodec("train", "--codec", codec, "--lmbda", lmbda, "--N", "8", "--M", "8",
                            "--patch-size", "64", "--batch-size", "2", "--max-steps", "3",
                            "--max-val-images", "1", "--max-side", "128",
                            "--checkpoint-dir", str(tmp_path / "ckpt" / f"{codec}-{lmbda}"),
                            cwd=tmp_path)
            train_id = re.findall(r"^[0-9a-f]{32}$", out, re.M)[-1]
            out = taskcodec("evaluate", "--checkpoint", train_id, "--max-images", "1",
                            "--max-side", "128", "--jpeg", "false", cwd=tmp_path)
            eval_id = re.search(r"MLflow run: ([0-9a-f]{32})", out).group(1)
            evaluated[eval_id] = client.get_run(eval_id).data.metrics

    out_dir = tmp_path / "rd"
    out = taskcodec("compare", "--output-dir", str(out_dir), cwd=tmp_path)
    # Two points per curve: plots and tables, and BD reported as not computable with the reason.
    assert re.search(r"bmshj2018-hyperprior\s+psnr\s+n/a\s+n/a\s+\(curve 'bmshj2018-\w+' has 2 "
                     r"psnr point\(s\); BD needs at least 4\)", out), out
    run_id = re.search(r"MLflow run: ([0-9a-f]{32})", out).group(1)
    assert set(client.get_run(run_id).data.tags["compared_run_ids"].split(",")) == set(evaluated)

    for metric in ("psnr", "ms_ssim"):
        with Image.open(out_dir / f"rd_{metric}.png") as img:
            img.load()
            assert img.size[0] > 0 and img.size[1] > 0
    rows = read_csv(out_dir / "points.csv")
    assert {r["run_id"] for r in rows} == set(evaluated)
    for row in rows:
        logged = evaluated[row["run_id"]]
        for key in ("bpp", "psnr", "ms_ssim"):
            assert float(row[key]) == logged[key]
    assert {r["curve"] for r in rows} == {"bmshj2018-factorized", "bmshj2018-hyperprior"}
    downloaded = client.download_artifacts(run_id, "comparison/rd_psnr.png", str(tmp_path / "dl"))
    with Image.open(downloaded) as img:
        assert img.format == "PNG" and img.size == Image.open(out_dir / "rd_psnr.png").size


# -- replicates: intervals, pairing by seed, equivalence, Pareto fronts ------------------------
T_975_4 = 2.7764451051977987  # Student t quantile 0.975 with 4 degrees of freedom
LAMBDAS = [0.0018, 0.0035, 0.0067, 0.013]


def seeded_runs(method: str, rates, psnrs, seeds=range(5), rate_factor=lambda s: 1.0,
                psnr_offset=lambda s: 0.0) -> list:
    """One evaluate-like run per seed and λ, tagged with its seed."""
    return [fake_run(evaluate_metrics(r * rate_factor(s), p + psnr_offset(s)),
                     {"lmbda": lm, "seed": s}, {"method": method, "seed": str(s)})
            for s in seeds for r, p, lm in zip(rates, psnrs, LAMBDAS)]


def test_replicates_at_one_operating_point_become_one_point_with_a_t_interval():
    offsets = [-2.0, -1.0, 0.0, 1.0, 2.0]
    runs = seeded_runs("a", RATES, PSNRS, psnr_offset=lambda s: offsets[s],
                       rate_factor=lambda s: 1 + 0.01 * offsets[s])
    (raw,) = cmp.curves_from_runs(runs, "method", replicate_key="seed")
    assert len(raw.points) == 20 and {p.replicate for p in raw.points} == {"0", "1", "2", "3", "4"}
    (mean,) = [cmp.aggregate_replicates(raw)]
    assert [p.n for p in mean.points] == [5] * 4
    assert [p.label for p in mean.points] == [f"λ={lm}" for lm in LAMBDAS]
    half = T_975_4 * math.sqrt(2.5) / math.sqrt(5)  # sd of -2..2 is sqrt(2.5)
    for p, rate, psnr in zip(mean.points, RATES, PSNRS):
        assert p.bpp == pytest.approx(rate) and p.metrics["psnr"] == pytest.approx(psnr)
        assert p.ci["psnr"] == pytest.approx((psnr - half, psnr + half))
        assert p.ci["rate"] == pytest.approx((rate * (1 - 0.01 * half), rate * (1 + 0.01 * half)))
    records = cmp.points_records([mean])
    assert records[0]["replicates"] == 5 and records[0]["psnr_ci_low"] == pytest.approx(
        PSNRS[0] - half)


def test_five_seeds_at_half_the_rate_give_minus_50_percent_with_a_zero_width_interval():
    # every seed moves both curves the same way: pairing cancels it exactly
    factor = lambda s: 1 + 0.1 * s  # noqa: E731
    runs = (seeded_runs("anchor", RATES, PSNRS, rate_factor=factor)
            + seeded_runs("half", [r / 2 for r in RATES], PSNRS, rate_factor=factor))
    raw = cmp.curves_from_runs(runs, "method", replicate_key="seed")
    rows = {r.quantity: r for r in cmp.paired_table(raw, raw[0], ["psnr"], margin=1.0)}
    bd = rows["bd_rate"]
    assert bd.seeds == 5 and not bd.error
    assert bd.mean == pytest.approx(-50.0, abs=1e-6) and bd.sd == pytest.approx(0.0, abs=1e-6)
    assert (bd.t_low, bd.t_high) == pytest.approx((-50.0, -50.0), abs=1e-6)
    assert (bd.boot_low, bd.boot_high) == pytest.approx((-50.0, -50.0), abs=1e-6)
    assert bd.p_value == 0.0 and bd.tost_p == 1.0  # -50 % is not within ±1 %
    assert rows["bd_metric"].mean == pytest.approx(3.0, abs=1e-6)
    # ΔJ at equal PSNR is the rate difference: half of each seed's mean anchor rate
    expected = [-sum(RATES) / 8 * factor(s) for s in range(5)]
    assert json.loads(rows["delta_j"].per_seed) == pytest.approx(
        {str(s): v for s, v in enumerate(expected)})
    assert rows["delta_j"].unit == "bpp"


def test_noisy_replicates_give_an_interval_that_contains_the_true_shift():
    import numpy as np

    rng = np.random.default_rng(7)
    noise = rng.normal(0, 0.05, size=8)
    runs = (seeded_runs("anchor", RATES, PSNRS, seeds=range(8))
            + seeded_runs("test", [r * 0.7 for r in RATES], PSNRS, seeds=range(8),
                          rate_factor=lambda s: 1 + noise[s]))
    raw = cmp.curves_from_runs(runs, "method", replicate_key="seed")
    (bd,) = [r for r in cmp.paired_table(raw, raw[0], ["psnr"], margin=5.0)
             if r.quantity == "bd_rate"]
    per_seed = json.loads(bd.per_seed)
    assert per_seed == pytest.approx({str(s): (0.7 * (1 + noise[s]) - 1) * 100 for s in range(8)})
    assert bd.t_low < -30.0 < bd.t_high and bd.boot_low < -30.0 < bd.boot_high
    assert bd.t_high - bd.t_low > 0.5 and bd.effect_size < -3 and bd.p_value < 1e-4
    # "similar" is a claim too: the same curves up to noise are equivalent within ±5 %
    same = (seeded_runs("anchor", RATES, PSNRS, seeds=range(8))
            + seeded_runs("same", RATES, PSNRS, seeds=range(8),
                          rate_factor=lambda s: 1 + noise[s] / 5))
    raw = cmp.curves_from_runs(same, "method", replicate_key="seed")
    (eq,) = [r for r in cmp.paired_table(raw, raw[0], ["psnr"], margin=5.0)
             if r.quantity == "bd_rate"]
    assert eq.tost_p < 0.05 and bd.tost_p > 0.5


def test_a_seed_missing_from_the_anchor_or_a_failing_seed_is_said():
    runs = (seeded_runs("anchor", RATES, PSNRS, seeds=[0, 1])
            + seeded_runs("test", RATES, PSNRS, seeds=[2]))
    raw = cmp.curves_from_runs(runs, "method", replicate_key="seed")
    rows = cmp.paired_table(raw, raw[0], ["psnr"])
    assert all("no seed in common" in r.error and r.mean is None for r in rows)


def test_pareto_front_drops_a_dip_smaller_than_the_noise_and_says_which():
    dip = curve("dip", [0.1, 0.2, 0.3, 0.4, 0.8], [26.0, 29.0, 29.0 - 0.01, 32.0, 35.0])
    anchor = curve("anchor", RATES, PSNRS)
    (plain,) = cmp.bd_table([anchor, dip], anchor, ["psnr"])
    assert plain.bd_rate is None and "does not improve" in plain.bd_rate_error
    (front,) = cmp.bd_table([anchor, dip], anchor, ["psnr"], pareto=True)
    assert front.bd_rate is not None and front.dropped == "dip: 0.3 bpp"
    assert "Pareto front dropped dip: 0.3 bpp" in cmp.format_bd([front], "anchor", "pchip")


def test_bd_rates_equal_the_bjontegaard_package_on_published_curves(tmp_path):
    import bjontegaard
    import numpy as np

    # shaped like CompressAI's published Kodak curves (not monotone in PSNR per bit)
    a = {"bpp": [0.122, 0.188, 0.287, 0.440, 0.647, 0.951],
         "psnr-rgb": [27.58, 29.20, 30.97, 32.87, 34.74, 36.62]}
    b = {"bpp": [0.108, 0.164, 0.253, 0.383, 0.565, 0.826],
         "psnr-rgb": [27.71, 29.33, 31.16, 33.08, 34.91, 36.79]}
    for name, results in (("a", a), ("b", b)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"name": name, "results": results}))
    ca, cb = (cmp.load_reference(tmp_path / f"{n}.json") for n in "ab")
    for method in cmp.BD_METHODS:
        expected = bjontegaard.bd_rate(np.array(a["bpp"]), np.array(a["psnr-rgb"]),
                                       np.array(b["bpp"]), np.array(b["psnr-rgb"]),
                                       method=method)
        assert cmp.bd_rate(ca, cb, "psnr", method) == pytest.approx(expected, abs=0.005)


# -- the bootstrap over images of single runs --------------------------------------------------
IMAGES = 32


def per_image_rows(rates, psnrs) -> list[dict]:
    """Rows of an evaluate run's per_image.csv (index, bpp, psnr)."""
    return [{"index": i, "bpp": float(r), "psnr": float(q)}
            for i, (r, q) in enumerate(zip(rates, psnrs))]


def log_per_image_curve(client, experiment_id: str, method: str, images) -> None:
    """One evaluate-like run per λ whose metrics are the means of its per-image rows, which
    it logs as evaluate does (evaluation/per_image.csv)."""
    for lmbda, rows in zip(LAMBDAS, images):
        bpp = sum(r["bpp"] for r in rows) / len(rows)
        psnr = sum(r["psnr"] for r in rows) / len(rows)
        run_id = log_eval_run(client, experiment_id, method, lmbda, {"bpp": bpp, "psnr": psnr})
        text = "index,bpp,psnr\n" + "".join(f"{r['index']},{r['bpp']!r},{r['psnr']!r}\n"
                                            for r in rows)
        client.log_text(run_id, text, "evaluation/per_image.csv")


def test_bootstrap_over_images_logged_in_a_tracking_store(tmp_path):
    """Per image: "half" codes every image with exactly half the anchor's bits at its PSNR
    (interval [-50, -50]); "noisy" with 0.8 times them up to per-image noise of mean 1 (the
    interval holds the true -20 %)."""
    import numpy as np
    from mlflow.tracking import MlflowClient

    from taskcodec import tracking

    rng = np.random.default_rng(3)
    hardness = np.linspace(0.5, 1.5, IMAGES)  # images differ: the points' means move
    offsets = rng.normal(0, 1.0, IMAGES)
    anchor = [per_image_rows(rate * hardness, psnr + offsets)
              for rate, psnr in zip(RATES, PSNRS)]
    half = [per_image_rows(rate * hardness / 2, psnr + offsets)
            for rate, psnr in zip(RATES, PSNRS)]
    noisy = [per_image_rows(0.8 * rate * hardness * rng.uniform(0.8, 1.2, IMAGES),
                            psnr + offsets + rng.normal(0, 0.3, IMAGES))
             for rate, psnr in zip(RATES, PSNRS)]
    client = MlflowClient(tracking.tracking_uri())
    name = "images"
    exp_id = client.create_experiment(name, artifact_location=(tmp_path / "art").as_uri())
    for method, images in (("anchor", anchor), ("half", half), ("noisy", noisy)):
        log_per_image_curve(client, exp_id, method, images)

    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["compare", "--experiment", name, "--anchor", "anchor",
                                      "--metric", "psnr", "--bootstrap-images", "100",
                                      "--bootstrap-seed", "5", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert "Bootstrap over images against 'anchor': 100 resamples" in result.output
    assert "seed 5" in result.output
    doc = json.loads((out / "image_bootstrap.json").read_text())
    assert (doc["resamples"], doc["seed"], doc["interval"]) == (100, 5, "percentile")
    rows = {r["curve"]: r for r in doc["rows"]}
    exact = rows["half"]
    assert exact["images"] == IMAGES and not exact["error"]
    assert exact["bd_rate_failed"] == exact["bd_metric_failed"] == 0
    assert (exact["bd_rate"], exact["bd_rate_low"], exact["bd_rate_high"]) == pytest.approx(
        (-50.0, -50.0, -50.0), abs=1e-6)
    # on all images, the bootstrap's point estimate is the BD table's (means of the rows)
    bd = {r["curve"]: r for r in json.loads((out / "bd.json").read_text())["rows"]}
    assert rows["noisy"]["bd_rate"] == pytest.approx(bd["noisy"]["bd_rate"], abs=1e-9)
    noise = rows["noisy"]
    assert noise["bd_rate_low"] < -20.0 < noise["bd_rate_high"]
    assert noise["bd_rate_high"] - noise["bd_rate_low"] > 1.0 and noise["bd_rate_high"] < -10
    assert noise["bd_metric_low"] < noise["bd_metric"] < noise["bd_metric_high"]
    assert [r["curve"] for r in read_csv(out / "image_bootstrap.csv")] == ["half", "noisy"]
    run = client.get_run(re.search(r"MLflow run: ([0-9a-f]{32})", result.output).group(1))
    assert run.data.params["bootstrap_images"] == "100"
    assert "**Bootstrap over images" in run.data.tags["mlflow.note.content"]


def test_bootstrap_over_images_says_why_a_pair_cannot_be_resampled():
    runs = seeded_runs("anchor", RATES, PSNRS, seeds=[0]) + seeded_runs("test", RATES, PSNRS,
                                                                       seeds=[0])
    anchor, test = cmp.curves_from_runs(runs, "method")
    tables = {p.run_id: {i: {"bpp": p.bpp, "psnr": p.metrics["psnr"]} for i in range(4)}
              for c in (anchor, test) for p in c.points}
    (same,) = cmp.image_bootstrap([anchor, test], anchor, ["psnr"], tables, resamples=100)
    assert same.bd_rate == pytest.approx(0.0, abs=1e-9) and same.images == 4
    assert (same.bd_rate_low, same.bd_rate_high) == pytest.approx((0.0, 0.0), abs=1e-9)
    (no_column,) = cmp.image_bootstrap([anchor, test], anchor, ["ms_ssim"], tables,
                                       resamples=100)
    assert "ms_ssim is not logged per image by run" in no_column.error
    missing = {k: v for k, v in tables.items() if k != test.points[0].run_id}
    (absent,) = cmp.image_bootstrap([anchor, test], anchor, ["psnr"], missing, resamples=100,
                                    missing={test.points[0].run_id: "no per_image.csv here"})
    assert absent.error == "no per_image.csv here" and absent.bd_rate is None
    reference = cmp.make_curve("ref", anchor.points, "reference")
    (published,) = cmp.image_bootstrap([reference, test], reference, ["psnr"], tables,
                                       resamples=100)
    assert "is a reference curve: it has no per-image results" in published.error
    with pytest.raises(ConfigError, match="--bootstrap-images 10 should be 0 \\(off\\) or >= 100"):
        cmp.CompareOptions(bootstrap_images=10)
    with pytest.raises(ConfigError, match="with --pair-by the seeds are the replicates"):
        cmp.CompareOptions(bootstrap_images=100, pair_by="seed")
