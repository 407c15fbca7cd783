"""Atomic writes: the target appears whole, with a plain open()'s permissions, and no temporary file stays."""
import os

import pytest

from rllc_fast.atomic import write_atomically, write_json_atomically


def test_written_file_has_plain_permissions_and_no_leftovers(tmp_path):
    old = os.umask(0o027)
    try:
        target = write_json_atomically(tmp_path / "sub" / "a.json", {"x": 1})
        assert os.umask(0o027) == 0o027  # the write did not leave another umask behind
    finally:
        os.umask(old)
    assert target.read_text() == '{"x": 1}'
    assert (target.stat().st_mode & 0o777) == 0o640
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(target, fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
