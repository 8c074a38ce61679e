"""The checked-in stubs must be what `make proto` generates from proto/ today."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUBS = ("steer_pb2.py", "steer_pb2.pyi", "steer_pb2_grpc.py")


def test_stubs_are_fresh(tmp_path):
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT / "proto"), f"--python_out={tmp_path}",
           f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(ROOT / "proto/steer/v1/steer.proto")]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    for name in STUBS:
        fresh = (tmp_path / "steer/v1" / name).read_text()
        checked_in = (ROOT / "steer/v1" / name).read_text()
        assert fresh == checked_in, f"steer/v1/{name} is stale: run `make proto` and commit the result"
