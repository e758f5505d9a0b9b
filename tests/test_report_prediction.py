"""The report's "What head figures predict" section: drawn from stored predictions, escaped, absent without them."""

from __future__ import annotations

import re

import numpy as np
from predict_helpers import add_run

from vheads.analysis.accuracy import estimate_accuracy
from vheads.analysis.errors import predict_runs
from vheads.report.build import build_report
from vheads.store import Store


def test_the_section_shows_roc_curves_the_loro_scatter_and_the_doubted_samples(tmp_path):
    path = tmp_path / "s.duckdb"
    with Store(path) as db:
        for i, shift in enumerate(np.linspace(-0.2, 0.2, 4)):
            add_run(db, f"r{i}", 120, seed=i, shift=float(shift))
    with Store(path, read_only=True) as db:
        assert db.predictions().empty and db.accuracy_estimates().empty
    page = build_report(path, tmp_path / "plain", overlays=0).read_text()
    assert "What head figures predict" not in page
    with Store(path) as db:
        predict_runs(db, ["r1", "r2"], n_boot=50)
        estimate_accuracy(db, "r3")
    page = build_report(path, tmp_path / "out", overlays=0).read_text()
    section = page[page.index('<section id="prediction">'):]
    section = section[:section.index("</section>")]
    assert "What head figures predict" in section and section.count("<img") == 2
    assert (tmp_path / "out" / "prediction-roc.png").stat().st_size > 5000
    assert (tmp_path / "out" / "prediction-loro.png").stat().st_size > 5000
    assert "<script>alert(1)</script>" not in section and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in section
    rows = re.findall(r"<tr><td class=\"text\">(r[12])</td>", section)
    assert len(rows) == 12 and set(rows) <= {"r1", "r2"}
    shown = [float(v) for v in re.findall(r"<td>(0\.\d+)</td><td class=\"text\">(?:yes|no)</td>", section)]
    assert shown == sorted(shown, reverse=True)
    assert "stored accuracy (not used)" in section
