"""Rewrite the committed reports docs/results/<profile>/REPORT.md from the committed small
result files (claims.json, points.csv, study tables) and the current panel specs, exactly as
tests/test_results_source.py regenerates them, keeping each report's "Made ..." line (when and
where its runs were made). Run it after editing a spec's title, notes or claims text:

    .venv/bin/python scripts/regenerate_reports.py [quick gap]

(With the run folders at hand, `raftorch reproduce all --profile P --redraw --export
docs/results/P` rewrites the report and the small files together.)"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from raftorch.experiments.spec import available, load_panel
from raftorch.experiments.suite import PanelResult, write_report

REPO = Path(__file__).resolve().parents[1]


def regenerate(profile: str) -> Path:
    export = REPO / "docs" / "results" / profile
    report = export / "REPORT.md"
    made = [line for line in report.read_text().splitlines() if line.startswith("Made ")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copytree(export, root / profile)
        results = [PanelResult(load_panel(pid, profile), json.loads((export / pid / "claims.json").read_text()), [])
                   for pid in available(profile)]
        text = write_report(profile, results, root, wall_seconds=0.0, redraw=True).read_text()
    lines = [made[0] if made and line.startswith("Made ") else line for line in text.splitlines()]
    tmp_path = report.with_name(report.name + ".tmp")
    tmp_path.write_text("\n".join(lines) + "\n")
    tmp_path.replace(report)
    return report


if __name__ == "__main__":
    for profile in sys.argv[1:] or ["quick", "gap"]:
        print(f"wrote {regenerate(profile).relative_to(REPO)}")
