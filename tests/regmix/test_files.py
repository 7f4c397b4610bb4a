from pathlib import Path

import pytest

from regmix.files import cache_root, replacing, write_text


def test_cache_root_respects_regmix_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGMIX_CACHE", "/somewhere/cache")
    assert cache_root() == Path("/somewhere/cache")
    monkeypatch.delenv("REGMIX_CACHE")
    assert cache_root() == Path.home() / ".cache" / "regmix"


def test_a_write_replaces_the_file_whole(tmp_path):
    target = tmp_path / "deep" / "result.json"
    write_text(target, "old")
    write_text(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]


def test_a_failed_write_leaves_the_old_file_and_no_partial(tmp_path):
    target = tmp_path / "result.json"
    write_text(target, "old")
    with pytest.raises(RuntimeError), replacing(target) as partial:
        partial.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_a_folder_is_replaced_whole_and_a_stale_partial_is_cleared(tmp_path):
    target = tmp_path / "model"
    with replacing(target) as folder:
        folder.mkdir()
        (folder / "a.txt").write_text("1")
    (tmp_path / "model.partial").mkdir()  # what a crash mid-write leaves behind
    (tmp_path / "model.partial" / "junk").write_text("x")
    with replacing(target) as folder:
        folder.mkdir()
        (folder / "b.txt").write_text("2")
    assert [p.name for p in target.iterdir()] == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
