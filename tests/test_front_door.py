"""Front-door details: messages during a progress bar get their own line; Figure 2's legend
covers no curve and explains the P-alignment lines."""
from __future__ import annotations

import io
import logging
import sys

from tqdm import tqdm

from raftorch.cli import _show_progress_messages


def test_a_message_during_a_progress_bar_gets_its_own_line(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    _show_progress_messages()
    with tqdm(total=3, file=err, ascii=True) as bar:
        bar.update(1)
        logging.getLogger("raftorch").info("loading the fast path")
        bar.update(1)
    lines = err.getvalue().replace("\r", "\n").split("\n")
    msg = [line for line in lines if "loading the fast path" in line]
    assert msg == ["raftorch: loading the fast path"]  # nothing of the bar on the message's line


def test_figure_2_has_one_legend_below_the_panels_with_the_alignment_lines_explained(tmp_path):
    from raftorch.theory import figure as F
    from raftorch.theory.result import load_results
    import raftorch.cli as cli

    out = tmp_path / "th"
    assert cli.main(["theory", "--out", str(out), "--method", "ode", "--t-end", "2"]) == 0
    meta, results = load_results(out / "theory.json")
    fig = F.build_figure(meta, results)
    assert all(ax.get_legend() is None for ax in fig.axes)  # nothing drawn over the curves
    assert len(fig.legends) == 1
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert [lab for lab in labels if lab.startswith("mode ")] == [f"mode {i}" for i in range(1, 6)]
    assert any("P alignment" in lab and "colour" in lab for lab in labels)
    assert fig.legends[0].get_window_extent(fig.canvas.get_renderer()).y1 < min(
        ax.get_window_extent().y0 for ax in fig.axes)  # below every panel
