"""Small operating-system helpers shared by light modules (no JAX import)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def pid_alive(pid: int) -> bool:
    """True while process `pid` runs on this host (also when it belongs to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        pass
    return True


def json_object(data: bytes | str, path: Path, error: type[Exception]) -> dict[str, Any]:
    """The JSON object in `data` (the content of file `path`), or `error` naming the file when it
    is not valid JSON or not an object."""
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise error(f"{path} holds a JSON {type(obj).__name__}; expected an object")
    return obj
