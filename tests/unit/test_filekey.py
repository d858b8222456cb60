"""
Tests for L{rqtwisted.filekey}.
"""

from __future__ import annotations

import os

from rqtwisted.filekey import file_key


def test_key_changes_with_edits_and_replacements(tmp_path) -> None:
    path = tmp_path / "f.json"
    path.write_text("{}")
    first = file_key(str(path))
    assert first is not None and first == file_key(str(path))
    path.write_text('{"a": 1}')  # edited in place: size
    second = file_key(str(path))
    assert second != first
    os.utime(path, ns=(1, 1))  # same size, other mtime
    assert file_key(str(path)) != second
    other = tmp_path / "g.json"
    other.write_text('{"a": 2}')
    os.utime(other, ns=(1, 1))
    os.rename(other, path)  # replaced: same size and mtime, other inode
    assert file_key(str(path)) not in (first, second, None)


def test_missing_and_dangling(tmp_path) -> None:
    assert file_key(str(tmp_path / "none")) is None
    os.symlink(tmp_path / "none", tmp_path / "link")
    assert file_key(str(tmp_path / "link")) is None
    (tmp_path / "target").write_text("x")
    os.symlink(tmp_path / "target", tmp_path / "good")
    assert file_key(str(tmp_path / "good")) == file_key(str(tmp_path / "target"))
