"""Atomic writes: all-or-nothing, and files get the permissions a plain open() or mkdir would give."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jfe.paths import atomic_dir, atomic_write


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_write_is_all_or_nothing(tmp_path: Path) -> None:
    target = tmp_path / "meta.json"
    with atomic_write(target) as handle:
        handle.write("old\n")
    with pytest.raises(RuntimeError), atomic_write(target) as handle:
        handle.write("half of the new")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]  # no temporary file left behind


def test_atomic_write_gives_the_mode_of_a_plain_open_or_of_the_file_it_replaces(tmp_path: Path) -> None:
    fresh = tmp_path / "report.md"
    with atomic_write(fresh) as handle:
        handle.write("x")
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~_umask()  # not mkstemp's 0600
    shared = tmp_path / "index.meta"
    shared.write_text("v1")
    shared.chmod(0o640)
    with atomic_write(shared) as handle:
        handle.write("v2")
    assert shared.read_text() == "v2" and shared.stat().st_mode & 0o777 == 0o640


def test_atomic_dir_swaps_a_whole_folder_with_mkdir_permissions(tmp_path: Path) -> None:
    target = tmp_path / "index"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("killed")
    assert (target / "a").read_text() == "1"
    assert target.stat().st_mode & 0o777 == 0o777 & ~_umask()  # not mkdtemp's 0700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]
