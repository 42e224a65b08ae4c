"""Progress bars: tqdm's live bar on a terminal, a readable line now and then in a log.

Without a terminal (a CI log, ``| tee``) carriage-return redraws pile up into one endless line;
there the bar prints whole lines instead: at most about every 10 % or every 30 s, plus the
final state. ``--quiet`` silences both.
"""

from __future__ import annotations

import io

import pytest

from guided_descent.experiments.progress import Progress


class Log(io.StringIO):
    """A stream that is not a terminal."""

    def isatty(self) -> bool:
        return False


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_log_gets_whole_lines_about_every_tenth_and_the_final_state():
    log = Log()
    with Progress(stream=log).bar(200, "moons", unit="run") as bar:
        for i in range(200):
            bar.set_postfix_str(f"seed={i}")
            bar.update()
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    # A start line, one per 10 % (the last one is the final state), nothing in between.
    assert len(lines) == 11, lines
    assert lines[0].startswith("moons: 0/200 run (0%)")
    assert lines[1].startswith("moons: 20/200 run (10%)") and "seed=19" in lines[1]
    assert lines[-1].startswith("moons: 200/200 run (100%)") and lines[-1].rstrip().endswith("done")


def test_a_slow_run_gets_a_line_every_30_seconds_between_tenths():
    log, clock = Log(), Clock()
    bar = Progress(stream=log, clock=clock).bar(1000, "bench", unit="step")
    for _ in range(20):  # 2 % in all, one step a minute
        clock.now += 60.0
        bar.update()
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 + 20 + 1, lines  # start, one per update (>= 30 s apart), final
    assert "1/1000 step" in lines[1] and "1m00s" in lines[1]
    assert lines[-1].startswith("bench: 20/1000 step (2%)") and "stopped" in lines[-1]


def test_updates_within_30_seconds_and_a_tenth_print_nothing():
    log, clock = Log(), Clock()
    bar = Progress(stream=log, clock=clock).bar(1000, "x")
    for _ in range(99):
        clock.now += 0.2
        bar.update()
    assert len(log.getvalue().splitlines()) == 1  # the start line only
    bar.close()
    bar.close()  # closing twice prints the final state once
    assert len(log.getvalue().splitlines()) == 2


def test_zero_total_and_overshoot_do_not_break_the_line():
    log = Log()
    with Progress(stream=log).bar(0, "empty") as bar:
        bar.update(3)
    assert log.getvalue().splitlines()[-1].startswith("empty: 3 step")


def test_a_terminal_keeps_the_live_tqdm_bar():
    term = Terminal()
    with Progress(stream=term).bar(5, "moons", unit="run") as bar:
        bar.update(5)
    assert "\r" in term.getvalue()  # tqdm redraws in place


def test_live_can_be_forced_either_way():
    log = Log()
    with Progress(stream=log, live=True).bar(3, "a") as bar:
        bar.update(3)
    assert "\r" in log.getvalue()
    term = Terminal()
    with Progress(stream=term, live=False).bar(3, "a") as bar:
        bar.update(3)
    assert "\r" not in term.getvalue() and term.getvalue().count("\n") == 2


@pytest.mark.parametrize("stream", [Log, Terminal])
def test_quiet_prints_nothing(stream):
    out = stream()
    with Progress(enabled=False, stream=out).bar(10, "moons") as bar:
        bar.set_postfix_str("x")
        bar.update(10)
    assert out.getvalue() == ""


def test_the_default_stream_is_stderr_at_the_time_of_the_bar(capsys):
    with Progress().bar(2, "quick") as bar:  # pytest's captured stderr is not a terminal
        bar.update(2)
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines()[-1].startswith("quick: 2/2 step (100%)")
