"""Writing outputs so that a crash never leaves a half-written file: temporary file, then rename.

Every atomic write in the toolkit goes through `atomic_path` (a file) or `atomic_dir` (a folder):
the output is written under a hidden temporary name beside its destination and renamed onto it
only once complete; on any error the temporary is removed and the destination is untouched.
"""

from __future__ import annotations

import glob
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from livetalk_cli.errors import UserError


def temp_beside(path: Path) -> Path:
    """A unique hidden name in `path`'s folder (same file system, so the rename is atomic):
    `.<name>.<pid>-<hex>.tmp`. Temporaries of the same destination left by processes that no
    longer run (a killed render) are removed first."""
    path = Path(path)
    remove_stale_temps(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


_TEMP_TAIL = re.compile(r"(?:(?P<pid>\d+)-)?[0-9a-f]{8}")  # "<pid>-<hex>", or "<hex>" (no pid: older)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove `path`'s temporaries whose writing process is gone; returns what was removed.
    A temporary of a process still running (another render of the same output) is left alone."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        match = _TEMP_TAIL.fullmatch(tmp.name[len(path.name) + 2: -len(".tmp")])
        if match is None or (match["pid"] and _pid_alive(int(match["pid"]))):
            continue  # another destination's temporary, or one still being written
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def check_writable(path: Path) -> None:
    """Raise UserError unless the file `path` could be created: its folder exists (or can be made)
    and accepts a new file. Tries it (a probe file, removed at once): permission bits do not tell
    for root or read-only mounts. Creates no folders."""
    path = Path(path)
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"cannot write {path}: {folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".livetalk-probe-", dir=folder)
    except OSError as e:
        raise UserError(f"cannot write {path}: folder {folder} is not writable ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """`with atomic_path(p) as tmp:` write the file `tmp`; it becomes `p` when the block succeeds."""
    tmp = temp_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(root: Path) -> Iterator[Path]:
    """`with atomic_dir(d) as tmp:` fill the new folder `tmp`; it replaces `d` when the block succeeds."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(root)
    tmp.mkdir()
    try:
        yield tmp
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_file(path: Path) -> None:
    """For an output whose folder must exist already (a report, a JSON): raise UserError now, before
    the work that makes it, unless the file can be written there."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"output directory does not exist: {path.parent}")
    check_writable(path)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it onto `path`."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"output directory does not exist: {path.parent}")
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from err


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def save_safetensors_atomic(tensors: dict[str, Any], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors `save_file`, atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
