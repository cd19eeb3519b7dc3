"""Writing and reading artifacts so that a killed job or an edited file is never trusted.

Every file is written to a temporary name in the same directory, fsynced and renamed, so a
reader sees either the old file or the whole new one; a model directory is written the same
way (`atomic_dir`). JSON artifacts carry a `checksum`
(sha256 of their canonical content without that field) and a `format` tag; `read_json`
verifies both and refuses, naming the file, anything truncated, edited or of another kind.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import DiskFull, UserError, no_space


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)`, fsync the result and rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and no_space(e):
            raise DiskFull(f"{path}: no space left on the device ({e.strerror}); the file as it was before is "
                           "intact (nothing half-written is left): free space and rerun") from None
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Write a directory atomically: yields a fresh directory beside `path` (same file system);
    when the block ends it replaces `path` (an older one is gone only between two renames), and
    on any error it is removed, leaving `path` as it was."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the result should read like any directory
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and no_space(e):
            raise DiskFull(f"{out}: no space left on the device ({e.strerror}); the directory was not replaced: "
                           "free space and rerun") from None
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True)


def checksum(obj: dict) -> str:
    return hashlib.sha256(canonical({k: v for k, v in obj.items() if k != "checksum"}).encode()).hexdigest()


def write_json(path: str | Path, obj: dict, fmt: str) -> dict:
    """Write a checksummed JSON artifact atomically; returns what was written."""
    obj = {"format": fmt, **{k: v for k, v in obj.items() if k not in ("format", "checksum")}}
    obj["checksum"] = checksum(obj)
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
    return obj


def read_json(path: str | Path, fmt: str | None = None) -> dict:
    """Read a checksummed JSON artifact, refusing corrupt, edited or foreign files.  `fmt`
    is the exact format tag expected; None accepts any blockpruner artifact (the summaries
    and analyses read every kind)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: missing artifact; run the stage that makes it first")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: corrupt artifact ({e.__class__.__name__}: {e}); delete it and rerun the stage") from None
    found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
    expected = found == fmt if fmt else str(found).startswith("blockpruner.")
    if not isinstance(obj, dict) or not expected:
        raise UserError(f"{path}: not a {fmt or 'blockpruner'} artifact (format={found!r}); check the path")
    if obj.get("checksum") != checksum(obj):
        raise UserError(f"{path}: checksum mismatch, the file was edited or damaged; delete it and rerun the stage")
    return obj


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_csv(path: str | Path, rows: list[dict]) -> None:
    """A table as CSV, written atomically; None is an empty cell."""

    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["empty"])
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if v is None else v) for k, v in r.items()})

    atomic_write(path, write)
