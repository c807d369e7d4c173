"""Progress bars outside a terminal: a few updates per loop, none from a loop inside another."""
import io
import sys

from common import progress


def _log_of(monkeypatch, work) -> str:
    """What the bars print while `work()` runs, with stderr a plain (non-terminal) stream."""
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    work()
    return log.getvalue()


def _updates(text: str, description: str) -> int:
    return sum(description in part for part in text.replace("\n", "\r").split("\r"))


def test_a_long_loop_prints_a_few_updates(monkeypatch):
    text = _log_of(monkeypatch, lambda: list(progress.progress(range(1000), "counting")))
    assert 1 <= _updates(text, "counting") <= progress.LOG_LINES + 2  # the opening line, the updates, the closing one
    assert "1000/1000" in text


def test_a_loop_inside_another_prints_nothing_in_a_log(monkeypatch):
    def work():
        for _ in progress.progress(range(20), "pairs"):
            list(progress.progress(range(5), "batches"))
        list(progress.progress(range(5), "afterwards"))  # the outer bar is closed: this one prints again
    text = _log_of(monkeypatch, work)
    assert _updates(text, "batches") == 0
    assert 1 <= _updates(text, "pairs") <= progress.LOG_LINES + 2
    assert _updates(text, "afterwards") >= 1


def test_hand_updated_bars_nest_the_same_way(monkeypatch):
    def work():
        with progress.bar("training", total=10, unit="step") as outer:
            for _ in range(10):
                list(progress.progress(range(3), "inner"))
                outer.update(1)
    text = _log_of(monkeypatch, work)
    assert _updates(text, "inner") == 0 and _updates(text, "training") >= 1


def test_an_abandoned_bar_does_not_silence_the_next_one(monkeypatch):
    def work():
        for _ in progress.progress(range(10), "left"):
            break  # the generator (and its bar) is dropped unfinished
        list(progress.progress(range(5), "next"))
    text = _log_of(monkeypatch, work)
    assert _updates(text, "next") >= 1
