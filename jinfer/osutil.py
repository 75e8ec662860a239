"""Small operating-system helpers shared by light modules (no JAX import)."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True while process `pid` runs on this host (also when it belongs to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        pass
    return True
