# Errors of the process runtime (the core's are in shardct/errors.py): what a CLI prints
# as one line instead of a traceback.
"""Runtime errors."""
from __future__ import annotations

from shardct.errors import ShardctError


class PoolStopped(ShardctError):
    """The pool stopped before its input was done (a boot failure, the dispatcher's
    death, a stop request). The message says why and what was lost."""
