"""tests/watched.py, the subprocess waits of the end-to-end tests: a command that keeps making
progress runs past the quiet limit; a silent, idle one (a hang) is stopped and reported."""

import sys
import time

import pytest

import watched

PYTHON = sys.executable


def test_a_command_that_keeps_writing_runs_past_the_quiet_limit():
    script = "import time\nfor i in range(8):\n    print(i, flush=True)\n    time.sleep(0.4)\n"
    start = time.monotonic()
    done = watched.run([PYTHON, "-c", script], quiet_s=1.5)
    assert time.monotonic() - start > 3.0  # longer than quiet_s: progress kept it alive
    assert done.returncode == 0 and done.stdout.split() == [str(i) for i in range(8)]


def test_a_command_that_changes_a_watched_file_runs_past_the_quiet_limit(tmp_path):
    path = tmp_path / "log.txt"
    script = (
        "import sys, time\n"
        "for i in range(8):\n"
        f"    open({str(path)!r}, 'a').write(str(i))\n"
        "    time.sleep(0.4)\n"
    )
    done = watched.run([PYTHON, "-c", script], watch=[tmp_path], quiet_s=1.5)
    assert done.returncode == 0 and path.read_text() == "01234567"


def test_a_silent_idle_command_is_stopped_as_a_hang_with_its_output():
    script = "import time\nprint('started', flush=True)\ntime.sleep(20)\n"
    start = time.monotonic()
    with pytest.raises(watched.Hang, match=r"(?s)hung: no output.*1 s.*started"):
        watched.run([PYTHON, "-c", script], quiet_s=1.0)
    assert time.monotonic() - start < 15  # stopped by the quiet limit, not at the sleep's end


def test_a_busy_loop_is_stopped_by_its_cpu_limit():
    with pytest.raises(watched.Hang, match=r"used \d+ s of CPU \(limit 2 s\)"):
        # A bounded loop, so a broken limit fails this test instead of hanging it.
        script = "import time\nstart = time.time()\nwhile time.time() - start < 20:\n    pass\n"
        watched.run([PYTHON, "-c", script], cpu_limit_s=2.0)


def test_wait_kills_the_others_when_one_fails():
    import subprocess

    failing = subprocess.Popen([PYTHON, "-c", "import sys, time; time.sleep(0.5); sys.exit(3)"])
    waiting = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(600)"])
    codes = watched.wait([failing, waiting], quiet_s=60)
    assert codes[0] == 3 and codes[1] != 0  # the sleeper was killed, not waited for
