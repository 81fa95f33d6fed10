"""Named fault points for crash tests: a kill injected at a known place, never by timing."""

import os
import signal

KILL_AT = "LMSTRAIN_KILL_AT"
FREEZE_AT = "LMSTRAIN_FREEZE_AT"


def fault_point(name: str) -> None:
    """Exit at once (status 137, as after SIGKILL) when the environment's LMSTRAIN_KILL_AT is
    ``name``: no cleanup, no ``finally`` blocks, files left as a kill would leave them. Stop
    the whole process (SIGSTOP: no thread runs, no heartbeat is sent, connections stay open,
    as when a machine vanishes) when LMSTRAIN_FREEZE_AT is ``name``."""
    if os.environ.get(KILL_AT) == name:
        os._exit(137)
    if os.environ.get(FREEZE_AT) == name:
        os.kill(os.getpid(), signal.SIGSTOP)
