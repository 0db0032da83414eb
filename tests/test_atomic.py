"""``pluralign._atomic``: a reader never sees a half-written file, a failed write leaves the old
file and no temporary behind, and written files get ``open()``'s permissions, not 0o600."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from pluralign._atomic import atomic_open, atomic_write_text, current_umask


def test_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "out.txt"  # the folder is created
    assert atomic_write_text(target, "first\n") == target
    atomic_write_text(target, "second é\n")
    assert target.read_text(encoding="utf-8") == "second é\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "model.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_open(target) as handle:
        handle.write("half of the new cont")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.json"]
    with pytest.raises(KeyboardInterrupt), atomic_open(tmp_path / "new.bin", "wb") as handle:
        handle.write(b"x")
        raise KeyboardInterrupt  # BaseException too: an interrupted run leaves nothing
    assert [p.name for p in tmp_path.iterdir()] == ["model.json"]


def test_until_the_block_ends_readers_see_the_old_contents(tmp_path):
    target = tmp_path / "results.jsonl"
    target.write_text("old\n")
    with atomic_open(target) as handle:
        handle.write("new\n")
        handle.flush()
        assert target.read_text() == "old\n"  # the new bytes are only in the temporary
    assert target.read_text() == "new\n"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_permissions_are_those_of_a_plain_open(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with open(tmp_path / "b.txt", "w") as handle:  # the oracle
            handle.write("x")
        assert current_umask() == umask
    finally:
        os.umask(old)
    mode_a = stat.S_IMODE((tmp_path / "a.txt").stat().st_mode)
    mode_b = stat.S_IMODE((tmp_path / "b.txt").stat().st_mode)
    assert mode_a == mode_b == 0o666 & ~umask


def test_concurrent_writers_leave_one_complete_version(tmp_path):
    target = tmp_path / "shared.txt"
    texts = [f"{i}\n" * 2000 for i in range(8)]
    threads = [threading.Thread(target=atomic_write_text, args=(target, t)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert target.read_text() in texts
    assert [p.name for p in tmp_path.iterdir()] == ["shared.txt"]
