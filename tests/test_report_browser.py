"""The report in a real browser (headless Chromium, offline): the script runs without errors, the heatmaps show."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from report_helpers import HOSTILE, synthetic_run

from vheads.report.build import build_report
from vheads.store import Store

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)")


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Run headless Chromium once with its own profile folder."""
    profile = tmp_path / "profile"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A report of a 40 x 40 and a 32 x 32 run, one named with a script tag."""
    root = tmp_path_factory.mktemp("browser")
    with Store(root / "s.duckdb") as store:
        synthetic_run(store, "wide", 40, 40, [(12, 20), (30, 1)])
        synthetic_run(store, f"named {HOSTILE}", 32, 32, [(3, 5)], seed=1)
    return build_report(root / "s.duckdb", root / "report", overlays=0)


def test_script_runs_and_marks_the_linked_head(page, tmp_path):
    result = chromium(tmp_path, "--dump-dom", page.as_uri() + "#head=12.20")
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    assert 'data-ready="2"' in dom
    assert "selected: layer 12, head 20" in dom and "visual head" in dom
    assert len(re.findall(r'class="marker" style="[^"]*display: block', dom)) == 4
    assert ":CONSOLE" not in result.stderr, [line for line in result.stderr.splitlines() if ":CONSOLE" in line]


def test_screenshot_shows_the_heatmap(page, tmp_path):
    shot = tmp_path / "shot.png"
    result = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", "--hide-scrollbars",
                      page.as_uri())
    assert shot.is_file(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int32)
    assert pixels.shape[:2] == (2000, 1280)
    heatmap = pixels[480:1000, 60:1160]
    coloured = (heatmap.max(axis=-1) - heatmap.min(axis=-1) > 40).mean()
    assert heatmap.std() > 25
    assert coloured > 0.4, f"only {coloured:.0%} of the heatmap region is coloured"


HOVER = """<script>
(function () {
  var box = document.querySelector('.heatmap'), img = box.querySelector('img');
  var data = JSON.parse(document.getElementById(box.getAttribute('data-json')).textContent);
  function hover() {
    var r = img.getBoundingClientRect(), e = data.panels[1].extent;
    var x = r.left + (e[0] + 20.5 / data.heads * (e[2] - e[0])) * r.width;
    var y = r.top + (e[1] + 12.5 / data.layers * (e[3] - e[1])) * r.height;
    img.dispatchEvent(new MouseEvent('mousemove', {clientX: x, clientY: y, bubbles: true}));
    document.body.setAttribute('data-tip', document.getElementById('tip').textContent);
  }
  if (img.complete) { hover(); } else { img.addEventListener('load', hover); }
})();
</script>"""


def test_hovering_a_heatmap_cell_shows_its_head(page, tmp_path):
    """A mouse move over cell (12, 20) of the score panel, as a user would make it, names that head."""
    probe = page.with_name("hover.html")
    probe.write_text(page.read_text().replace("</body>", HOVER + "</body>"))
    result = chromium(tmp_path, "--dump-dom", "--window-size=1280,2000", probe.as_uri())
    tip = re.search(r'data-tip="([^"]*)"', result.stdout)
    assert tip, result.stderr[-2000:]
    assert tip[1].startswith("layer 12, head 20") and "visual head" in tip[1]
