"""Stage timings: they add up per name, nest without double counting, and cost nothing unrecorded."""

import time

from decouple.nn.stopwatch import current, recording, stage


def test_stages_add_up_under_their_name_and_nested_ones_count_once():
    with recording() as t:
        for _ in range(3):
            with stage("pricing cp", announce=False):
                time.sleep(0.01)
        with stage("calibration"):
            with stage("inner"):
                time.sleep(0.02)
    assert list(t.seconds) == ["pricing cp", "calibration"]
    assert t.seconds["pricing cp"] >= 0.03 and t.seconds["calibration"] >= 0.02
    d = t.to_dict()
    assert t.total() >= sum(t.seconds.values()) and d["other"] >= 0


def test_nothing_is_recorded_outside_recording(capsys):
    assert current() is None
    with stage("loading"):
        pass
    assert current() is None
    assert capsys.readouterr().err == ""


def test_progress_prints_one_line_per_announced_stage(capsys):
    with recording(progress=True, min_seconds=0.0):
        with stage("loading"):
            pass
        with stage("pricing nd", announce=False):
            pass
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "loading:" in err[0]


def test_the_stages_that_raise_the_peak_memory_are_named(monkeypatch):
    from decouple.nn import stopwatch

    readings = iter([1.0, 1.0, 1.0, 2.5, 2.5, 2.5])  # (enter, exit) of three stages
    monkeypatch.setattr(stopwatch, "peak_rss_gb", lambda: next(readings))
    with recording() as t:
        with stage("loading"):
            pass
        with stage("pricing"):
            pass
        with stage("writing"):
            pass
    assert t.to_dict()["peak_rss_gb"] == {"pricing": 2.5}
    assert stopwatch.peak_rss_gb is not None


def test_peak_memory_is_read_from_the_os():
    from decouple.nn.stopwatch import peak_rss_gb

    assert 0.01 < peak_rss_gb() < 1000  # a Python process with torch loaded


def test_a_group_of_silent_stages_gets_one_line(capsys):
    from decouple.nn import stopwatch

    with recording(progress=True, min_seconds=0.0) as t:
        t.add("pricing nd", 1.25)
        t.add("pricing cp", 2.5)
        t.add("calibration", 9.0)
        stopwatch.announce_group("pricing")
        stopwatch.announce_group("writing")  # nothing of that name: no line
    assert capsys.readouterr().err == "pricing: nd 1.2 s, cp 2.5 s\n"
    stopwatch.announce_group("pricing")  # not recording: silent
    assert capsys.readouterr().err == ""
