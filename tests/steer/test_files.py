"""steer/files.py: atomic file and directory writes, JSON Lines reading with file:line errors."""

import json
import os
import stat

import pytest

from steer.errors import InvalidInput
from steer.files import (
    LineError,
    atomic_directory_write,
    atomic_file,
    atomic_write_bytes,
    atomic_write_text,
    json_lines,
    utf8_lines,
)

# ------------------------------------------------------------------------------------ atomic writes


def test_atomic_write_text_writes_utf8_replaces_and_leaves_a_shared_file(tmp_path):
    path = tmp_path / "out.json"
    assert atomic_write_text(path, "first\n") == path
    assert atomic_write_text(str(path), "zweite — ünïcode\n") == path  # str paths too; replaces
    assert path.read_bytes() == "zweite — ünïcode\n".encode()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's private 0600
    assert os.listdir(tmp_path) == ["out.json"]  # no temporary left beside it


def test_atomic_write_bytes(tmp_path):
    path = tmp_path / "blob.bin"
    atomic_write_bytes(path, b"\x00\xff\n")
    assert path.read_bytes() == b"\x00\xff\n"
    assert os.listdir(tmp_path) == ["blob.bin"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_failure_inside_the_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, error):
    path = tmp_path / "report.json"
    path.write_text("old complete contents\n")
    with pytest.raises(error):
        with atomic_file(path) as tmp:
            assert tmp.parent == tmp_path and tmp != path
            tmp.write_text('{"half": ')  # a writer that dies half-way
            raise error()
    assert path.read_text() == "old complete contents\n"
    assert os.listdir(tmp_path) == ["report.json"]


def test_a_failed_first_write_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_bytes(tmp_path / "new.bin", "not bytes")  # fails inside the write
    assert os.listdir(tmp_path) == []


def test_atomic_file_keeps_the_suffix_for_writers_that_choose_a_format_by_it(tmp_path):
    path = tmp_path / "curve.png"
    with atomic_file(path) as tmp:
        assert tmp.suffix == ".png" and tmp.name.startswith(".tmp-curve.png-")
        assert tmp.exists()  # created (empty) so that no one else takes the name
        assert not path.exists()  # the target appears only when the block succeeds
        tmp.write_bytes(b"PNG")
    assert path.read_bytes() == b"PNG"
    assert os.listdir(tmp_path) == ["curve.png"]


def test_atomic_file_needs_the_parent_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write_text(tmp_path / "missing" / "x.txt", "x")
    assert os.listdir(tmp_path) == []


def test_atomic_directory_write_replaces_a_directory_or_keeps_the_old_one(tmp_path):
    final = tmp_path / "model"

    def write(version):
        def fill(d):
            (d / "weights").write_text(version)
        return fill

    atomic_directory_write(final, write("v1"))
    atomic_directory_write(final, write("v2"))
    assert (final / "weights").read_text() == "v2"
    assert stat.S_IMODE(final.stat().st_mode) == 0o755

    def failing(d):
        (d / "weights").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_directory_write(final, failing)
    assert os.listdir(final) == ["weights"] and (final / "weights").read_text() == "v2"
    assert os.listdir(tmp_path) == ["model"]


# ------------------------------------------------------------------------------------ JSON Lines


def test_json_lines_numbers_lines_and_skips_blank_ones(tmp_path):
    path = tmp_path / "rows.jsonl"
    # U+2028 and U+0085 may appear raw in a JSON string (json.dumps(ensure_ascii=False) leaves them):
    # str.splitlines would cut the line there. CRLF endings are fine.
    path.write_bytes('{"a": 1}\n\n   \n{"t": "x\u2028y\u0085z"}\r\n[2]'.encode())
    assert list(json_lines(path)) == [(1, {"a": 1}), (4, {"t": "x\u2028y\u0085z"}), (5, [2])]
    assert [n for n, _ in utf8_lines(path)] == [1, 2, 3, 4, 5]


def test_json_syntax_errors_name_file_line_and_column(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"b": }\n')
    with pytest.raises(LineError) as e:
        list(json_lines(path))
    assert isinstance(e.value, InvalidInput)
    assert str(e.value) == f"{path}:3: not valid JSON (Expecting value at column 7)"
    assert (e.value.field, e.value.path, e.value.lineno) == (f"{path}:3", path, 3)
    assert isinstance(e.value.cause, json.JSONDecodeError) and e.value.cause.msg == "Expecting value"


def test_bytes_that_are_not_utf8_name_file_line_and_column(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"a": 1}\n{"caf\xe9": 2}\n')
    with pytest.raises(LineError) as e:
        list(json_lines(path))
    assert str(e.value) == f"{path}:2: not valid UTF-8 (byte 0xe9 at column 6); save the file as UTF-8"
    assert isinstance(e.value.cause, UnicodeDecodeError)


def test_a_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(json_lines(tmp_path / "missing.jsonl"))


def test_load_prompts_keeps_its_own_wording(tmp_path):
    from steer.eval_grid import load_prompts

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "Say hi."}\nnot json\n')
    with pytest.raises(InvalidInput) as e:
        load_prompts(path)
    assert str(e.value) == f"prompts: {path}:2: not valid JSON (Expecting value)"
    path.write_bytes(b'{"prompt": "caf\xe9"}\n')  # was a UnicodeDecodeError traceback for the whole file
    with pytest.raises(InvalidInput) as e:
        load_prompts(path)
    assert str(e.value) == f"prompts: {path}:1: not valid UTF-8 (byte 0xe9 at column 16); save the file as UTF-8"
