"""The MLflow UI shows our runs: headless Chromium opens a real server's experiment page.

The UI is a single-page app, so the check reads the DOM after the app rendered it
(``--dump-dom`` after a virtual-time budget) and looks for the run names, rather than trusting
that a screenshot file exists. Chromium is the Debian package ``scripts/system-deps`` installs.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from mlflow.entities import Metric, Param
from PIL import Image

pytestmark = pytest.mark.server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
WINDOW = (1400, 900)
# Flags from shared/notes/infra.md: no sandbox (root in CI), nothing fetched from the internet.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium(url: str, profile: Path, *extra: str, budget_ms: int = 30000) -> str:
    """Run headless Chromium on ``url``; its stdout (the DOM with --dump-dom)."""
    profile.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}",
                           f"--virtual-time-budget={budget_ms}", *extra, url],
                          capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"chromium failed on {url}:\n{done.stderr[-2000:]}"
    return done.stdout


@pytest.fixture
def ui_runs(mlflow_server):
    """An experiment with evaluate-like runs of known names; (experiment id, run names)."""
    if not Path(CHROMIUM).is_file():
        pytest.skip("no chromium: run `make system-deps` (scripts/system-deps) as root")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    tag = uuid.uuid4().hex[:6]
    experiment_id = client.create_experiment(f"ui-{tag}")
    names = []
    for codec in ("factorized", "hyperprior"):
        for i, lmbda in enumerate((0.0035, 0.013)):
            name = f"eval-{codec}-{lmbda}-{tag}"
            run_id = client.create_run(experiment_id, run_name=name,
                                       tags={"method": codec, "entry_point": "evaluate"}).info.run_id
            bpp = 0.2 * 2 ** i
            client.log_batch(run_id, params=[Param("lmbda", str(lmbda))],
                             metrics=[Metric("bpp", bpp, 0, 0),
                                      Metric("psnr", 28.0 + 3 * i + (codec == "hyperprior"), 0, 0)])
            client.set_terminated(run_id)
            names.append(name)
    return mlflow_server.uri, experiment_id, names


def test_runs_page_renders_the_run_names(ui_runs, tmp_path):
    uri, experiment_id, names = ui_runs
    url = f"{uri}/#/experiments/{experiment_id}/runs"
    dom = chromium(url, tmp_path / "profile-dom", "--dump-dom")
    assert "<html" in dom.lower()
    missing = [n for n in names if n not in dom]
    assert not missing, f"the runs page did not render {missing}"

    shot = tmp_path / "runs.png"
    chromium(url, tmp_path / "profile-shot", f"--screenshot={shot}",
             f"--window-size={WINDOW[0]},{WINDOW[1]}")
    with Image.open(shot) as img:
        img.verify()  # a complete, uncorrupted PNG
    with Image.open(shot) as img:
        assert img.format == "PNG" and img.size == WINDOW
        # A rendered page, not a blank one: many distinct colours.
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50


def test_chart_view_offers_the_rd_metrics(ui_runs, tmp_path):
    uri, experiment_id, names = ui_runs
    url = f"{uri}/#/experiments/{experiment_id}/runs?compareRunsMode=CHART"
    # Charts render only when on screen: give the page a desktop-sized window.
    dom = chromium(url, tmp_path / "profile", "--dump-dom", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                   budget_ms=60000)
    for metric in ("bpp", "psnr"):
        assert f">{metric}<" in dom, f"no chart titled {metric} in the chart view"
