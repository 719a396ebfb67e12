"""Progress inside a round (clients, generators, server fine-tuning) on a terminal, so a slow
round is not minutes of silence; nothing when stderr is not a terminal (logs, sweeps)."""

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def phase(items: Iterable[T], desc: str, unit: str, total: int | None = None) -> Iterator[T]:
    """``items``, with a transient bar named ``desc`` that ticks once per item on a terminal
    (tqdm's ``disable=None``); per client, node or epoch, never per step: no host sync."""
    return iter(tqdm(items, desc=desc, unit=unit, total=total, leave=False, disable=None))


def stage(desc: str) -> tqdm:
    """A transient one-step bar named ``desc`` for work that runs as one call (every node's
    generators stacked): ``with stage(...) as bar: ...; bar.update()``."""
    return tqdm(desc=desc, unit="step", total=1, leave=False, disable=None)
