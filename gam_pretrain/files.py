"""Small file helpers every stage shares: JSON read with the file named in its error, atomic writes."""
from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any


def first_line(error: BaseException) -> str:
    """An error's first non-empty line (library errors can run to many lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: str | Path) -> Any:
    """A JSON file's value; a missing, truncated or garbled file raises one line naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON (truncated or garbled?): {e}") from None


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write a whole file or nothing: a temporary file per process, fsynced, then renamed over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def writer_alive(tmp: Path) -> bool:
    """Whether the process that is writing temporary file `tmp` (see write_atomic) may still be running:
    true unless it ran on this host and its pid is gone (a writer killed mid-write left it)."""
    pid = tmp.name.rsplit(".", 2)[-2]
    if not pid.isdigit() or not tmp.name.endswith(f".{socket.gethostname()}.{pid}.tmp"):
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
