"""Command-line entry points: instant --help with examples, and the client against a live server."""

import subprocess
import sys

import pytest

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["steer.serve", "steer.client", "steer.train", "steer.server.bench",
                                    "steer.server.bench_long_prompt"])
def test_help_shows_examples(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Examples:" in out.stdout or "examples:" in out.stdout.lower()


def test_client_prints_text_and_direction(tiny_server):
    out = subprocess.run(
        [sys.executable, "-m", "steer.client", "Say hi", "--target", tiny_server.target,
         "--weights", "helpfulness=0.7,creativity=0.3", "--max-new-tokens", "5", "--seed", "1"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    assert "helpfulness=0.70" in out.stderr and "creativity=0.30" in out.stderr and "conciseness=0.00" in out.stderr
    assert "FINISH_REASON_LENGTH" in out.stderr


def test_client_stream_and_server_error(tiny_server):
    out = subprocess.run(
        [sys.executable, "-m", "steer.client", "Say hi", "--target", tiny_server.target, "--weights", "humour=1",
         "--stream"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 1
    assert "INVALID_ARGUMENT: weights[humour]: unknown objective" in out.stderr


def test_client_rejects_malformed_weights():
    out = subprocess.run([sys.executable, "-m", "steer.client", "hi", "--weights", "helpfulness:1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "expected name=value" in out.stderr


def test_serve_reports_a_missing_model():
    out = subprocess.run([sys.executable, "-m", "steer.serve", "--model", "/no/such/dir"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "model: '/no/such/dir' not found" in out.stderr


@pytest.mark.parametrize("flag, value, message", [
    ("--default-dry-multiplier", "-1", "default_dry_multiplier: must be finite and >= 0"),
    ("--default-max-new-tokens", "0", "default_max_new_tokens: must be an integer >= 1"),
])
def test_serve_names_a_bad_sampling_default_by_its_flag(flag, value, message):
    out = subprocess.run([sys.executable, "-m", "steer.serve", flag, value, "--model", "/no/such/dir"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert message in out.stderr


def test_client_sends_dry_fields(tiny_server):
    """--dry-* reach the server's validation (a bad value comes back naming the request field)."""
    out = subprocess.run(
        [sys.executable, "-m", "steer.client", "Say hi", "--target", tiny_server.target, "--max-new-tokens", "3",
         "--dry-multiplier", "0.8", "--dry-allowed-length", "0"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 1
    assert "INVALID_ARGUMENT: sampling.dry_allowed_length: must be an integer >= 1" in out.stderr
