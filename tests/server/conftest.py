"""Fixtures of the server tests: polling for a condition, and a ``steer.serve`` process of its own."""

import os
import re
import subprocess
import sys
import time

import pytest


def _wait_until(condition, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.fixture(scope="session")
def wait_until():
    """``wait_until(condition, timeout=20.0)``: polls ``condition()`` until it is true; fails after ``timeout`` s."""
    return _wait_until


@pytest.fixture()
def serve_process():
    """Factory: ``start(argv, ready)`` runs ``python *argv`` (one thread, unbuffered output) and reads its
    output up to the first line matching the regex ``ready``; returns (process, match, lines read). A
    process still running at the end of the test is killed."""
    started = []

    def start(argv, ready):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env)
        started.append(proc)
        output, match = [], None
        for line in proc.stdout:
            output.append(line)
            match = re.search(ready, line)
            if match:
                break
        assert match, "".join(output)
        return proc, match, output

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
