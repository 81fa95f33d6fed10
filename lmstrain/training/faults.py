"""Named fault points for crash tests: a kill injected at a known place, never by timing."""

import os

KILL_AT = "LMSTRAIN_KILL_AT"


def fault_point(name: str) -> None:
    """Exit at once (status 137, as after SIGKILL) when the environment's LMSTRAIN_KILL_AT is
    ``name``: no cleanup, no ``finally`` blocks, files left as a kill would leave them."""
    if os.environ.get(KILL_AT) == name:
        os._exit(137)
