"""Writing outputs so that a crash never leaves a half-written file: temporary file, then rename."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from livetalk_cli.errors import UserError


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it onto `path`."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"output directory does not exist: {path.parent}")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {err.strerror or err}") from err


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")
