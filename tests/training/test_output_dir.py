"""Training output paths: a file or an unwritable place is refused with InvalidInput("output", ...)
before any data or model is read, nothing is created by the check, and a refused run leaves no
directory behind. Every command (dpo, dpa, reward, export) goes through the same check."""

import json
import os

import pytest
from steer.training import output_dir
from steer.training.output_dir import check_output_dir

from steer.errors import InvalidInput

PAIRS = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": f"No idea about {i}."} for i in range(4)]


def read_only(monkeypatch, directory):
    """Make ``directory`` unwritable: by its mode bits, and for root (whom mode bits do not stop) by
    answering for it the way ``os.access`` does on a read-only file system."""
    directory.chmod(0o555)
    if os.geteuid() == 0:
        real = output_dir._writable
        monkeypatch.setattr(output_dir, "_writable", lambda d: d != directory.absolute() and real(d))


@pytest.fixture()
def no_model(monkeypatch):
    """Any model load fails the test: the output check must come first."""
    def refuse(*args, **kwargs):
        pytest.fail("the model was loaded before the output path was checked")

    for target in ("steer.training.dpo.build_policy", "steer.training.dpa.load_base",
                   "steer.training.reward_model.build_model"):
        monkeypatch.setattr(target, refuse)


def test_check_accepts_new_and_existing_directories_and_creates_nothing(tmp_path):
    assert check_output_dir(tmp_path) == tmp_path
    deep = tmp_path / "a" / "b" / "c"
    assert check_output_dir(str(deep)) == deep
    assert not (tmp_path / "a").exists()


def test_check_refuses_a_file_a_path_under_a_file_and_a_dangling_link(tmp_path):
    file = tmp_path / "f.txt"
    file.write_text("x")
    with pytest.raises(InvalidInput, match=r"^output: .*f\.txt exists and is not a directory"):
        check_output_dir(file)
    with pytest.raises(InvalidInput, match=r"^output: .*f\.txt/run cannot be created: .*f\.txt is a file"):
        check_output_dir(file / "run")
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    with pytest.raises(InvalidInput, match=r"^output: .*link is a symbolic link to nothing"):
        check_output_dir(tmp_path / "link")


def test_check_refuses_read_only_places(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only(monkeypatch, locked)
    try:
        with pytest.raises(InvalidInput, match=r"^output: .*locked is not writable"):
            check_output_dir(locked)
        with pytest.raises(InvalidInput, match=r"^output: .*locked/run cannot be created: .*locked is not writable"):
            check_output_dir(locked / "run")
        # An atomic export writes a sibling and renames it: its parent must be writable.
        with pytest.raises(InvalidInput, match=r"^output: .*locked/adapter cannot be created"):
            check_output_dir(locked / "adapter", renamed_into_place=True)
    finally:
        locked.chmod(0o755)


def _cli(command):
    if command == "dpo":
        from steer.training.dpo_cli import main
    elif command == "dpa":
        from steer.training.dpa_cli import main
    else:
        from steer.training.reward_cli import main
    return main


def _args(command, tmp_path, output):
    data = tmp_path / "data.jsonl"
    if command == "dpa":
        data.write_text('{"prompt": "Name a fruit."}\n')
        return ["--prompts", str(data), "--output", str(output), "--scorer", "flr:helpfulness+length",
                "--objectives", "helpfulness", "conciseness", "--guided-samples", "0", "--contrast-samples", "0",
                "--no-progress"]
    if command == "reward":
        data.write_text(json.dumps({"prompt": "hi", "response": "ok", "helpfulness": 1}) + "\n")
        return ["--data", str(data), "--output", str(output), "--no-progress"]
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return ["--data", str(data), "--output", str(output), "--no-progress"]


@pytest.mark.parametrize("command", ["dpo", "dpa", "reward"])
def test_cli_refuses_a_file_or_read_only_output_before_loading_the_model(command, tmp_path, monkeypatch, capsys,
                                                                         no_model):
    main = _cli(command)
    file = tmp_path / "taken"
    file.write_text("not a directory")
    assert main(_args(command, tmp_path, file)) == 2
    err = capsys.readouterr().err
    assert f"error: output: {file} exists and is not a directory" in err and "Traceback" not in err, err

    locked = tmp_path / "locked"
    locked.mkdir()
    read_only(monkeypatch, locked)
    try:
        assert main(_args(command, tmp_path, locked / "run")) == 2
        err = capsys.readouterr().err
        assert f"error: output: {locked / 'run'} cannot be created: {locked} is not writable" in err, err
        assert main(_args(command, tmp_path, locked)) == 2
        assert f"error: output: {locked} is not writable" in capsys.readouterr().err
    finally:
        locked.chmod(0o755)
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("command", ["dpo", "dpa", "reward"])
def test_bad_data_leaves_no_output_directory(command, tmp_path, capsys, no_model):
    main = _cli(command)
    args = _args(command, tmp_path, tmp_path / "out" / "run")
    data = tmp_path / "data.jsonl"
    bad_line = len(data.read_text().splitlines()) + 1
    data.write_bytes(data.read_bytes() + b'{"prompt": "caf\xe9"}\n')  # Latin-1, not UTF-8
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{data}:{bad_line}: not valid UTF-8 (byte 0xe9 at column 16)" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_read_only_destination_before_reading_weights(tmp_path, monkeypatch, capsys):
    from steer.training.export_cli import main

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"not read")  # reading it would fail loudly
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only(monkeypatch, locked)
    try:
        assert main(["--adapter", str(adapter), "--output", str(locked / "shipped"), "--base-name", "org/m"]) == 2
        assert (f"error: output: {locked / 'shipped'} cannot be created: {locked} is not writable"
                in capsys.readouterr().err)
    finally:
        locked.chmod(0o755)
    (tmp_path / "file").write_text("x")
    assert main(["--adapter", str(adapter), "--output", str(tmp_path / "file"), "--base-name", "org/m"]) == 2
    assert f"error: output: {tmp_path / 'file'} exists and is not a directory" in capsys.readouterr().err
