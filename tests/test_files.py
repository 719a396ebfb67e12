"""Atomic writes: umask modes, stale temporaries, one-line errors for unusable folders."""

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from flcore.errors import ConfigError
from flcore.files import (
    atomic_write_bytes,
    new_file_mode,
    remove_stale_temporaries,
    require_writable_dir,
    write_json,
)


@pytest.fixture(params=[0o022, 0o002], ids=["umask022", "umask002"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run the test under each umask, restoring the previous one afterwards."""
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_get_the_umask_mode(tmp_path: Path, umask: int) -> None:
    atomic_write_bytes(tmp_path / "a.bin", b"new")
    write_json(tmp_path / "results.json", {"x": 1})
    assert mode(tmp_path / "a.bin") == 0o666 & ~umask
    assert mode(tmp_path / "results.json") == 0o666 & ~umask
    assert (tmp_path / "a.bin").read_bytes() == b"new"


def test_atomic_write_replaces_a_private_file_with_the_umask_mode(tmp_path: Path,
                                                                  umask: int) -> None:
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    target.chmod(0o600)
    atomic_write_bytes(target, b"new")
    assert (target.read_bytes(), mode(target)) == (b"new", 0o666 & ~umask)
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_new_file_mode_follows_the_umask_and_leaves_no_probe(tmp_path: Path, umask: int) -> None:
    assert new_file_mode(tmp_path) == 0o666 & ~umask
    assert list(tmp_path.iterdir()) == []


def test_prepared_yamnet_model_is_readable_by_others(tmp_path: Path, umask: int) -> None:
    pytest.importorskip("onnx")
    from flcore.encoders.audio import prepare_yamnet, yamnet_zip

    target = prepare_yamnet(yamnet_zip(), tmp_path / "models" / "yamnet-test")
    files = sorted(target.parent.iterdir())
    assert [f.name for f in files] == ["model.data", "model.onnx"]
    assert {mode(f) for f in files} == {0o666 & ~umask}
    assert list((tmp_path / "models").iterdir()) == [target.parent]


def test_interrupted_write_leaves_a_temporary_that_the_next_start_removes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def killed(fd: int) -> None:
        raise KeyboardInterrupt

    keep = tmp_path / ".hydra"
    keep.mkdir()
    (tmp_path / "notes.tmp").write_text("user file")
    (tmp_path / ".a.tmp").write_text("too short to be ours")
    (tmp_path / "checkpoint.pt").write_bytes(b"ok")
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", killed)
        with pytest.raises(KeyboardInterrupt):
            atomic_write_bytes(tmp_path / "checkpoint.pt", b"half")
    # A process killed with SIGKILL runs no cleanup: its temporary stays behind.
    leftover = tmp_path / ".checkpoint.pt.abcd1234.tmp"
    leftover.write_bytes(b"half")
    old_style = tmp_path / ".results.json.k_3x9qzp.tmp"  # tempfile.mkstemp's naming
    old_style.write_bytes(b"{")
    assert remove_stale_temporaries(tmp_path) == sorted([leftover, old_style])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".a.tmp", ".hydra", "checkpoint.pt", "notes.tmp"]
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"ok"
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_require_writable_dir_creates_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "b"
    assert require_writable_dir(folder, "cache_dir") == folder
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_require_writable_dir_names_the_key_when_the_path_is_a_file(tmp_path: Path) -> None:
    file = tmp_path / "cache"
    file.write_text("")
    with pytest.raises(ConfigError) as err:
        require_writable_dir(file, "cache_dir", env="FEDA2V_CACHE_DIR")
    assert str(err.value) == (f"cache_dir={file}: is a file, not a folder; "
                              "set cache_dir=<a writable folder> or FEDA2V_CACHE_DIR")


def test_require_writable_dir_names_the_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    folder = tmp_path / "file" / "run" / "1"
    with pytest.raises(ConfigError) as err:
        require_writable_dir(folder, "hydra.run.dir")
    assert str(err.value) == (f"hydra.run.dir={folder}: cannot create the folder "
                              f"({tmp_path / 'file'} is a file); "
                              "set hydra.run.dir=<a writable folder>")


def test_require_writable_dir_rejects_an_unwritable_folder(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "readonly"
    folder.mkdir(mode=0o500)
    if os.access(folder, os.W_OK):  # root writes anywhere: make the write fail as it would
        def denied(*args: object, **kwargs: object) -> None:
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr("tempfile.TemporaryFile", denied)
    with pytest.raises(ConfigError, match=r"^cache_dir=.*readonly: cannot write into the folder "
                                          r"\(Permission denied\); set cache_dir="):
        require_writable_dir(folder, "cache_dir")


def test_require_writable_dir_reports_a_folder_it_cannot_create(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(ConfigError, match=r"^cache_dir=.*new: cannot create the folder "
                                          r"\(Permission denied\); set cache_dir="):
        require_writable_dir(tmp_path / "new", "cache_dir")
