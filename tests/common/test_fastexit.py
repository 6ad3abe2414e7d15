"""exit_now: a program leaves without Python's module teardown, but only after everything a
normal exit would have finished (threads, executors, atexit handlers, log files, streams)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.helpers import ROOT

PROGRAM = textwrap.dedent("""
    import atexit, logging, sys, threading, time
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path
    from common.fastexit import exit_now

    out = Path(sys.argv[1])
    log = logging.getLogger("x")
    handler = logging.FileHandler(out / "log.txt")
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)

    def slow(name):
        time.sleep(0.5)
        (out / name).write_text("done")

    threading.Thread(target=slow, args=("thread.txt",)).start()  # not a daemon: exit waits for it
    ThreadPoolExecutor(1).submit(slow, "executor.txt")  # neither shut down nor waited for here
    atexit.register(lambda: (out / "atexit.txt").write_text("ran"))
    log.info("last line of the log")
    sys.stdout.write("no newline at the end")  # still buffered when exit_now is called
    exit_now(int(sys.argv[2]))
""")


def test_exit_now_finishes_threads_atexit_logs_and_streams_then_keeps_the_exit_code(tmp_path):
    for code in (0, 3):
        out = tmp_path / str(code)
        out.mkdir()
        p = subprocess.run([sys.executable, "-c", PROGRAM, str(out), str(code)], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == code, p.stderr
        assert p.stdout == "no newline at the end"
        assert (out / "thread.txt").read_text() == "done" and (out / "executor.txt").read_text() == "done"
        assert (out / "atexit.txt").read_text() == "ran"
        assert (out / "log.txt").read_text() == "last line of the log\n"
