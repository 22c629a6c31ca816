"""The progress bar every long command uses: few whole lines when stderr is a log file, nothing with
VISAE_PROGRESS=0, and no summary line after a failure (the error stays the log's last line)."""

from __future__ import annotations

import io

import pytest

from visae.progress import counted, progress


def test_a_bar_in_a_log_writes_whole_lines_with_its_rate(monkeypatch):
    monkeypatch.delenv("VISAE_PROGRESS", raising=False)
    log = io.StringIO()
    bar = progress(total=1000, desc="train", unit="tokens", unit_scale=True, file=log, interval=0.0)
    for _ in range(4):
        bar.update(250)
    bar.close()
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert lines[-1].startswith("train: 100% 1.00k/1.00k tokens [") and " tokens/s]" in lines[-1]
    assert len(lines) == len(set(lines)) <= 6  # the start, 4 updates, no repeated summary


def test_a_short_run_in_a_log_is_silent_and_a_long_one_ends_with_one_summary_line(monkeypatch):
    monkeypatch.delenv("VISAE_PROGRESS", raising=False)
    log = io.StringIO()
    for _ in counted([[0] * 10] * 30, total=300, desc="extract", unit="images", file=log):
        pass
    assert log.getvalue() == ""  # shorter than LOG_INTERVAL: a quick step says nothing
    clock = iter(range(0, 1000, 7))  # a run of ~200 s on a fake clock: lines every 20 s, then the summary
    bar = progress(total=300, desc="extract", unit="images", file=log)
    bar._time = lambda: float(next(clock))
    bar.start_t = bar.last_print_t = bar._time()
    for _ in range(30):
        bar.update(10)
    bar.close()
    lines = log.getvalue().splitlines()
    assert 1 < len(lines) <= 12 and len(lines) == len(set(lines))
    assert lines[-1].startswith("extract: 100% 300/300 images [") and "images/s" in lines[-1]


def test_an_unfinished_or_failed_bar_leaves_no_line(monkeypatch):
    monkeypatch.delenv("VISAE_PROGRESS", raising=False)
    log = io.StringIO()
    bar = progress(total=100, desc="train", unit="tokens", file=log)
    bar.update(40)
    bar.close()  # stopped early: the caller's error speaks
    with pytest.raises(ValueError):
        for _ in counted(range(10), total=10, desc="x", unit="steps", size=lambda _: 1, file=log):
            raise ValueError("boom")
    assert log.getvalue() == ""


def test_visae_progress_0_and_enabled_false_turn_it_off(monkeypatch):
    log = io.StringIO()
    monkeypatch.setenv("VISAE_PROGRESS", "0")
    bar = progress(total=10, desc="a", unit="steps", file=log, interval=0.0)
    bar.update(10)
    bar.close()
    monkeypatch.delenv("VISAE_PROGRESS")
    assert list(progress(range(3), desc="b", unit="steps", file=log, enabled=False, interval=0.0)) == [0, 1, 2]
    assert log.getvalue() == ""
