"""Results from one source: each committed report (docs/results/<profile>/REPORT.md, the quick
profile and the gap study) is what raftorch writes from the committed claims.json / points.csv
(and the study tables) and the current specs, and the README's quick-profile tables are that
report's, not numbers typed by hand. When a spec or a result changes, `raftorch reproduce all
--profile P --redraw --export docs/results/P` regenerates the report (after an edit of a spec's
text alone, scripts/regenerate_reports.py does it from the committed files), and the README's compact
block (the summary line and the "Summary by panel" table) is copied from it. The docs pages
include the reports themselves (pymdownx.snippets), so they hold no copy to check."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from raftorch.experiments.spec import available, load_panel
from raftorch.experiments.suite import PanelResult, write_report

REPO = Path(__file__).resolve().parents[1]
EXPORT = REPO / "docs" / "results" / "quick"
PROFILES = ("quick", "gap")  # the profiles whose results are committed under docs/results/


def _without_provenance(text: str) -> list[str]:
    # the "Made <date> by raftorch ..., <cpu>" line says when and where, not what
    return [line for line in text.splitlines() if not line.startswith("Made ")]


def regenerated(profile: str, root: Path) -> str:
    """REPORT.md as raftorch writes it from the committed ``docs/results/<profile>`` files."""
    export = REPO / "docs" / "results" / profile
    shutil.copytree(export, root / profile)
    results = [PanelResult(load_panel(pid, profile), json.loads((export / pid / "claims.json").read_text()), [])
               for pid in available(profile)]
    return write_report(profile, results, root, wall_seconds=0.0, redraw=True).read_text()


@pytest.mark.parametrize("profile", PROFILES)
def test_the_committed_report_is_what_the_committed_results_and_specs_give(profile, tmp_path):
    committed = (REPO / "docs" / "results" / profile / "REPORT.md").read_text()
    assert _without_provenance(regenerated(profile, tmp_path)) == _without_provenance(committed)


def _summary_block(text: str, heading: str, start: str | None = None) -> list[str]:
    """The summary line (``**27 hold, ... (of 52 claims).**``, the first after ``start``, else
    the first in ``text``) and the rows of the first table after ``heading``."""
    lines = text.splitlines()
    first = lines.index(start) if start else 0
    summary = [line for line in lines[first:] if line.startswith("**") and line.endswith("claims).**")]
    i = lines.index(heading)
    table = []
    for line in lines[i + 1:]:
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    return summary[:1] + table


def test_the_readme_summary_is_the_reports():
    readme = (REPO / "README.md").read_text()
    committed = (EXPORT / "REPORT.md").read_text()
    report = _summary_block(committed, "## Summary by panel")
    assert len(report) > 3, "the quick report has no summary line or no per-panel table"
    heading = "### Quick profile: claims by panel"
    assert _summary_block(readme, heading, start=heading) == report
