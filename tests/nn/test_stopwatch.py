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
