"""A few seconds of locust against the tiny-model server: requests flow and none fail."""

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_short_locust_run(tiny_server, tmp_path):
    prefix = tmp_path / "steer"
    out = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests/locustfile.py"), "--headless", "-u", "4",
         "-r", "4", "-t", "4s", "--host", tiny_server.target, "--csv", str(prefix), "--only-summary"],
        capture_output=True, text=True, timeout=120, env={"STEER_MAX_NEW_TOKENS": "8", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {r["Name"]: r for r in csv.DictReader(open(f"{prefix}_stats.csv"))}
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 0
    assert int(total["Failure Count"]) == 0
    assert {"Generate", "GenerateStream ttft", "GenerateStream total"} <= set(rows)
