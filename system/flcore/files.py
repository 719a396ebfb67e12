"""Atomic file writes and the checks around them: a reader never sees a half-written file, even
if the writer is killed, and files get the permissions the user's umask asks for.

Temporary files are created with ``os.open(..., 0o666)``, so the kernel applies the umask (or a
folder's default ACL) exactly as for any other new file: the umask is never read with
``os.umask``, which would briefly change it for every thread of the process.
"""

import csv
import errno
import io
import json
import math
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flcore.errors import ConfigError

TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
"""Names of the temporaries of :func:`atomic_write_bytes`: ``.{name}.{8 characters}.tmp``."""


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new file ``.{path.name}.{random}.tmp`` beside ``path``, open for writing, mode
    ``0o666`` less the umask (``tempfile.mkstemp`` would make it ``0o600``)."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def new_file_mode(folder: Path) -> int:
    """The permission bits a new file in ``folder`` gets (``0o666`` less the umask), for files
    that a library creates with a stricter mode. Found with a probe file, never ``os.umask``."""
    fd, probe = _create_temporary(Path(folder) / ".mode-probe")
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        probe.unlink()


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporaries that interrupted :func:`atomic_write_bytes` calls left directly in
    ``folder`` and return them. Call it only on folders no other live process writes into."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(p for p in folder.iterdir()
                   if TEMPORARY.fullmatch(p.name) and p.is_file() and not p.is_symlink())
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def require_writable_dir(path: Path, key: str, env: str | None = None) -> Path:
    """Create folder ``path`` if needed and check that files can be created in it; otherwise
    raise a one-line ConfigError naming ``key`` (and ``env``, the variable that also sets it)."""
    path = Path(path)
    fix = f"set {key}=<a writable folder>" + (f" or {env}" if env else "")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{key}={path}: is a file, not a folder; {fix}") from None
    except OSError as err:
        raise ConfigError(f"{key}={path}: cannot create the folder ({_reason(path, err)}); "
                          f"{fix}") from None
    try:
        tempfile.TemporaryFile(dir=path).close()
    except OSError as err:
        raise ConfigError(f"{key}={path}: cannot write into the folder "
                          f"({err.strerror or err}); {fix}") from None
    return path


def _reason(path: Path, err: OSError) -> str:
    """Why ``mkdir`` failed, naming the ancestor that is a file rather than a folder."""
    if err.errno == errno.ENOTDIR:
        blocker = next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            return f"{blocker} is a file"
    return err.strerror or str(err)


def write_csv(path: Path, columns: list[str], rows: list[Mapping[str, Any]]) -> None:
    """Atomically write ``rows`` as a CSV with a header of ``columns``."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def write_json(path: Path, payload: Any) -> None:
    """Atomically write ``payload`` as indented JSON; NaN and infinities become null."""
    atomic_write_text(path, json.dumps(_finite(payload), indent=2, sort_keys=False) + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
