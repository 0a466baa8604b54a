"""progress_bar: plain lines on stderr when it is not a terminal, nothing on stdout."""

import io

from decouple.nn.progress import progress_bar


def test_piped_progress_prints_plain_lines_to_stderr_only(capsys):
    for p in range(2):  # every pass says something, each line whole
        for _ in progress_bar(range(50), desc=f"pass {p}", enabled=True, interval=0):
            pass
    out, err = capsys.readouterr()
    assert out == "" and "\r" not in err
    assert "pass 0" in err and "pass 1" in err and "50/50" in err
    bar = progress_bar(total=3, desc="manual", enabled=True, unit="batch", interval=0)
    bar.update(3)
    bar.close()
    out, err = capsys.readouterr()
    assert out == "" and "3/3" in err and all(line.isascii() for line in err.splitlines())


def test_disabled_progress_is_silent(capsys):
    assert list(progress_bar(range(3), desc="x", enabled=False)) == [0, 1, 2]
    assert capsys.readouterr() == ("", "")


def test_a_terminal_gets_a_live_bar(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    monkeypatch.setattr("sys.stderr", tty)
    for _ in progress_bar(range(5), desc="live", enabled=True):
        pass
    assert "\r" in tty.getvalue()
