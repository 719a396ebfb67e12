"""``main.py``'s one-line errors for what Hydra refuses while composing the config: an unknown
group option, a value of the wrong type, a misspelt key, an override it cannot parse. They read
``error: KEY=VALUE: ...`` as the project's own checks do; ``HYDRA_FULL_ERROR=1`` keeps Hydra's
full trace."""

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from flcore.config import schema_keys, unknown_key

# omegaconf's type errors (first line) and what the value must be instead.
_TYPE_RULES = (
    (re.compile(r"could not be converted to Integer"), "must be an integer"),
    (re.compile(r"could not be converted to Float"), "must be a number"),
    (re.compile(r"is not a valid bool"), "must be true or false"),
    (re.compile(r"expected one of \[(.*)\]"), "must be one of {0}"),
)


def _type_rule(message: str) -> str:
    """What a value refused by the schema must be, from omegaconf's message."""
    first = message.splitlines()[0]
    for pattern, rule in _TYPE_RULES:
        found = pattern.search(first)
        if found:
            return rule.format(*found.groups())
    return first


def compose_error_line(err: Exception) -> str | None:
    """``err`` (raised by Hydra while composing) as one line without ``error:``, or None for
    an error this does not know (Hydra then reports it its own way)."""
    if isinstance(err, MissingConfigException) and err.missing_cfg_file:
        group, _, name = err.missing_cfg_file.rpartition("/")
        available = f"; available: {', '.join(err.options)}" if err.options else ""
        return f"{group}={name}: no such option{available}"
    if isinstance(err, OverrideParseException):
        reason, _, see = err.message.partition("\n")
        see = see.replace("See ", "see ", 1).removesuffix(" for details")
        return f"{err.override}: cannot parse it ({reason}); {see}"
    cause, text = err.__cause__, str(err)
    if isinstance(cause, ValidationError) and text.startswith("Error merging override "):
        return f"{text.removeprefix('Error merging override ')}: {_type_rule(str(cause.msg))}"
    missing = re.match(r"Could not override '([^']+)'", text)
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and missing:
        key = missing.group(1)
        return None if key.startswith("hydra.") else str(unknown_key(key, schema_keys()))
    return None


@contextmanager
def one_line_compose_errors() -> Iterator[None]:
    """Within the block, Hydra's compose errors end the process with ``error: ...``. Hydra
    catches every exception inside ``hydra.main`` and prints its own text, so this wraps the
    function Hydra reports through (``hydra._internal.utils.run_and_report``)."""
    from hydra._internal import utils

    report = utils.run_and_report

    def translated(func: Callable[[], Any]) -> Any:
        def call() -> Any:
            try:
                return func()
            except (ConfigCompositionException, OverrideParseException) as err:
                line = None if os.environ.get("HYDRA_FULL_ERROR") == "1" else (
                    compose_error_line(err))
                if line is None:
                    raise
                raise SystemExit(f"error: {line}") from None

        return report(call)

    utils.run_and_report = translated
    try:
        yield
    finally:
        utils.run_and_report = report
