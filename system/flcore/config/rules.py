"""The one way a config check refuses: a line naming the key, its value as the command line
writes it, and what is allowed."""

from enum import Enum
from typing import Any

from flcore.errors import ConfigError


def show(value: Any) -> str:
    """``value`` as the command line writes it: an enum by its value, a list as ``[a,b]``."""
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(show(v) for v in value) + "]"
    return str(value)


def require(ok: bool, key: str, value: Any, rule: str) -> None:
    """Refuse ``key=value`` with ``rule`` (one line) unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}={show(value)}: {rule}")
