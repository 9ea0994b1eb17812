"""Atomic file writes: reports and plots replace a file whole or not at all."""

from pathlib import Path

import pytest

from prunescope import atomic
from prunescope.report import write_json, write_text
from prunescope.report.plots import new_figure, save_figure


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_replacing_publishes_the_file_whole(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    with atomic.replacing(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".txt" and tmp != target
        tmp.write_text("new")
        assert not target.exists()  # nothing at the path until the body is done
    assert target.read_text() == "new"
    assert _siblings(target.parent) == ["a.txt"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic.replacing(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert _siblings(tmp_path) == ["a.txt"]


def test_reports_and_plots_are_written_through_a_temporary_sibling(tmp_path, monkeypatch):
    write_json({"x": 1}, tmp_path / "report.json")
    write_text("# r", tmp_path / "report.md")
    fig = new_figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    save_figure(fig, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _siblings(tmp_path) == ["plot.png", "report.json", "report.md"]

    def broken(self, path, **kw):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(fig), "savefig", broken)
    with pytest.raises(OSError):
        save_figure(fig, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the finished plot stays
    assert _siblings(tmp_path) == ["plot.png", "report.json", "report.md"]
