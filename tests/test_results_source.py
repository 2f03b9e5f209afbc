"""Results from one source: each committed report (docs/results/<profile>/REPORT.md, the quick
profile and the gap study) is what raftorch writes from the committed claims.json / points.csv
(and the study tables) and the current specs, and the README's quick-profile tables are that
report's, not numbers typed by hand. When a spec or a result changes, `raftorch reproduce all
--profile P --redraw --export docs/results/P` and the README's tables are regenerated together."""
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


def _section(text: str, start: str, end: str) -> list[str]:
    lines = text.splitlines()
    i = lines.index(start)
    j = next(k for k in range(i + 1, len(lines)) if lines[k].startswith(end))
    return [line for line in lines[i + 1:j] if line.startswith(("|", "- ", "**fig"))]


def test_the_readme_tables_are_the_reports():
    readme = (REPO / "README.md").read_text()
    committed = (EXPORT / "REPORT.md").read_text()
    paper = _section(committed, "## The paper's claims", "## ")
    ours = _section(committed, "## Our own claims", "## ")
    control = _section(committed, "## The no-feedback control", "## ")
    assert paper and ours and control
    r_paper = _section(readme, "**The paper's claims**", "**Our own claims**")
    r_ours = _section(readme, "**Our own claims** (controls, field scores)", "**The no-feedback control**")
    r_control = _section(readme, "**The no-feedback control** (rule `frozen`: hidden layers frozen at initialisation, only the",
                         "![fig2]")
    assert (r_paper, r_ours, r_control) == (paper, ours, control)
    summary = next(line for line in committed.splitlines() if line.startswith("**") and "claims)" in line)
    assert f"The result: {summary}" in readme
