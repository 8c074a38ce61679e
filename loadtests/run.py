"""Start a steer server, run locust headless against it for a fixed time, stop the server.

Examples:
  python loadtests/run.py                          # default model, 16 users, 60 s, CSVs in loadtests/results/
  python loadtests/run.py --users 32 --time 120s --max-new-tokens 64
  python loadtests/run.py --model ./tiny-model --users 4 --time 5s --csv /tmp/lt/steer

Writes locust's CSVs (<csv>_stats.csv, _failures.csv, _stats_history.csv) and exits non-zero if
any request failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from steer.client import free_port, wait_until_serving

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--spawn-rate", type=float, default=4.0)
    p.add_argument("--time", default="60s", help="locust run time, e.g. 30s, 2m")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--csv", default=str(HERE / "results" / "steer"), help="CSV path prefix")
    p.add_argument("--serve-args", default="", help="extra arguments for python -m steer.serve")
    args = p.parse_args(argv)

    port = free_port()
    target = f"127.0.0.1:{port}"
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen([sys.executable, "-m", "steer.serve", "--model", args.model, "--port", str(port),
                               "--log-level", "WARNING", *args.serve_args.split()])
    try:
        print(f"loadtest: waiting for the server on {target} ...", flush=True)
        wait_until_serving(target, server, timeout=300)
        env = dict(os.environ, STEER_MAX_NEW_TOKENS=str(args.max_new_tokens))
        cmd = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless", "-u", str(args.users),
               "-r", str(args.spawn_rate), "-t", args.time, "--host", target, "--csv", args.csv, "--only-summary"]
        return subprocess.run(cmd, env=env).returncode
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
