"""Whether a process id is alive: the one check the spool's run files, staging and slots share."""
from __future__ import annotations

import os


def pid_alive(pid: object) -> bool:
    """True while a process with this id exists (also one we may not signal); False for an
    id that is not a positive int. A reused id reads as alive: callers that must tell a new
    process from the one they recorded compare start times as well."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
