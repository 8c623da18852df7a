# Error kinds: remote faults become verdicts (never exceptions); config faults raise
# RuleError/ConfigError naming file and line; anything else is a bug.
"""Exceptions raised by the core.

Malformed packets are *not* exceptions: kernels give them a verdict and a counter.
Only configuration and API misuse raise.
"""


class ShardctError(Exception):
    """Base class for every error the core raises."""


class ConfigError(ShardctError):
    """A configuration value is unusable. ``where`` names the file (and line)."""

    def __init__(self, where: str, reason: str):
        self.where = where
        self.reason = reason
        super().__init__(f"{where}: {reason}")


class RuleError(ConfigError):
    """A rule file line cannot be loaded: ``file:line: reason``."""

    def __init__(self, filename: str, lineno: int, reason: str):
        self.filename = filename
        self.lineno = lineno
        super().__init__(f"{filename}:{lineno}", reason)


class InvariantViolation(ShardctError):
    """An internal invariant broke: a bug in shardct, not bad input."""
