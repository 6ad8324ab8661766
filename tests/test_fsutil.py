"""The one-line words of a failed write, and the check of an output flag before any work."""

import errno

import pytest

from realm import fsutil
from realm.errors import WriteError
from realm.fsutil import output_problem, write_errors


def test_a_failed_write_is_one_line_with_its_cause_and_other_errors_pass_through(tmp_path,
                                                                              monkeypatch):
    with pytest.raises(WriteError, match=rf"^writing x under {tmp_path} failed: no space left on "
                                         rf"the device \(\d+ MiB free under {tmp_path}\); kept$"):
        with write_errors(f"writing x under {tmp_path}", str(tmp_path / "not-yet"), "kept"):
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
    with pytest.raises(KeyError):  # not a write's failure, and the disk is fine: as it is
        with write_errors("w", str(tmp_path)):
            raise KeyError("k")
    monkeypatch.setattr(fsutil, "disk_problem", lambda path: f"permission denied: {path}")
    with pytest.raises(WriteError, match=r"^w failed: permission denied: "):
        with write_errors("w", str(tmp_path)):  # torch's words for a full disk
            raise RuntimeError("[enforce fail at inline_container.cc] iostream error")
    with pytest.raises(WriteError, match=r"^w failed: Disk quota exceeded$"):
        with write_errors("w", None):  # an object store: the error's own words
            raise OSError(errno.EDQUOT, "Disk quota exceeded")


def test_an_output_path_is_checked_before_any_work(tmp_path):
    (tmp_path / "a-file").write_text("")
    assert output_problem(str(tmp_path / "a-file" / "sub" / "out.jsonl")) == \
        f"{tmp_path}/a-file is a regular file, not a directory"
    assert output_problem(str(tmp_path)) == f"{tmp_path} is a directory, not a file"
    assert output_problem(str(tmp_path / "a-file"), directory=True) == \
        f"{tmp_path}/a-file is a regular file, not a directory"
    assert output_problem(str(tmp_path / "new" / "deeper" / "out.jsonl")) is None
    assert output_problem(str(tmp_path / "report"), directory=True) is None
