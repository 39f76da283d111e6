"""The analysis report: self-contained HTML that a real browser renders without errors."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from lepredict import report
from lepredict.predictor import StabilityPredictor

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report_file(runs, tmp_path_factory):
    frame = runs.copy()
    frame.loc[frame.index[:5], "state"] = "PRUNED"  # as a pruned sweep leaves them
    model = StabilityPredictor(budget=1).fit(runs)
    path = tmp_path_factory.mktemp("report") / "r.html"
    report.analyze(frame, path, model=model, title="synthetic", reference=runs)
    return path


def test_report_holds_every_figure_offline(report_file):
    text = report_file.read_text()
    assert text.count('id="figure-') == 5
    assert "5 pruned" in text and "<script src=" not in text  # plotly.js inlined, no CDN
    for title in ("trainable vs untrainable", "Kaplan-Yorke", "Hyperparameter maps",
                  "Calibration", "pruned trials"):
        assert title in text


def test_no_finished_runs_is_a_clear_error(runs, tmp_path):
    frame = runs.assign(state="RUNNING")
    with pytest.raises(ValueError, match="no finished trials"):
        report.analyze(frame, tmp_path / "x.html")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium_without_console_errors(report_file):
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
         "--v=0", "--virtual-time-budget=15000", "--dump-dom", report_file.as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    console = [line for line in out.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    dom = out.stdout
    # Each figure's div was filled in by plotly.js: it drew an SVG plot inside it.
    for i in range(5):
        body = dom.split(f'id="figure-{i}"', 1)[1][:20000]
        assert 'class="main-svg"' in body, f"figure {i} not rendered"
    assert len(re.findall(r'class="scatterlayer', dom)) >= 5
