"""The one atomic write, for files and for folders."""

from __future__ import annotations

import json

import pytest

from common.atomic import atomic_write, atomic_write_json, publish_dir


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"auc": 0.9})

    def half(fh):
        fh.write('{"auc": 0.')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, half)
    assert json.loads(target.read_text()) == {"auc": 0.9}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_mode_is_set_before_the_file_appears(tmp_path):
    key = tmp_path / "site.key"
    atomic_write(key, lambda fh: fh.write("secret"), mode=0o600)
    assert key.stat().st_mode & 0o777 == 0o600


def test_a_folder_is_published_whole_and_a_finished_one_is_kept(tmp_path):
    ours, final = tmp_path / ".cache.tmp-1", tmp_path / "cache"
    ours.mkdir()
    (ours / "meta.json").write_text("ours")
    final.mkdir()  # an empty folder is replaced
    assert publish_dir(ours, final) and (final / "meta.json").read_text() == "ours" and not ours.exists()

    late = tmp_path / ".cache.tmp-2"
    late.mkdir()
    (late / "meta.json").write_text("late")
    assert not publish_dir(late, final)  # another process finished first: theirs stays
    assert (final / "meta.json").read_text() == "ours" and not late.exists()

    with pytest.raises(OSError):
        publish_dir(tmp_path / "missing", tmp_path / "elsewhere")
