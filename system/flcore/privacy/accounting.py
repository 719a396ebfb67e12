"""Privacy accounting of DP-SGD with Opacus' accountants: the epsilon a node has spent after its
Poisson-sampled Gaussian steps, and the noise multiplier that meets a target epsilon over the
steps a run plans. Opacus is an optional dependency (``pip install -e ".[privacy]"``)."""

from dataclasses import dataclass, field
from typing import Any

from flcore.errors import ConfigError

#: The accountants ``privacy.accountant`` names: Rényi DP (Mironov 2017) and the privacy
#: random variable accountant (Gopi et al. 2021).
ACCOUNTANTS = ("rdp", "prv")


def _opacus() -> Any:
    try:
        from opacus import accountants
    except ImportError as err:
        raise ConfigError('privacy=dp needs Opacus: pip install -e ".[privacy]"') from err
    return accountants


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
            accountant: str = "rdp") -> float:
    """The epsilon at ``delta`` of ``steps`` Poisson-sampled Gaussian steps (sampling rate
    ``sample_rate``, noise ``noise_multiplier`` times the clipping norm)."""
    return History([(noise_multiplier, sample_rate, steps)]).epsilon(delta, accountant)


def noise_for(target_epsilon: float, sample_rate: float, steps: int, delta: float,
              accountant: str = "rdp") -> float:
    """The smallest noise multiplier (to Opacus' search tolerance of 0.01 in epsilon) whose
    ``steps`` steps spend at most ``target_epsilon``."""
    return _opacus().utils.get_noise_multiplier(
        target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
        steps=steps, accountant=accountant)


@dataclass
class History:
    """One node's DP-SGD steps as ``(noise_multiplier, sample_rate, steps)`` entries, so the
    epsilon it has spent can be read at any time and saved in a checkpoint."""

    entries: list[tuple[float, float, int]] = field(default_factory=list)

    def add(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        if self.entries and self.entries[-1][:2] == (noise_multiplier, sample_rate):
            self.entries[-1] = (noise_multiplier, sample_rate, self.entries[-1][2] + steps)
        else:
            self.entries.append((noise_multiplier, sample_rate, steps))

    def epsilon(self, delta: float, accountant: str = "rdp") -> float:
        """The epsilon at ``delta`` of every step so far (0 before any)."""
        if not self.entries:
            return 0.0
        if accountant not in ACCOUNTANTS:
            raise ConfigError(f"privacy.accountant={accountant}: must be one of "
                              f"{', '.join(ACCOUNTANTS)}")
        counter = _opacus().create_accountant(mechanism=accountant)
        counter.history = list(self.entries)
        return float(counter.get_epsilon(delta=delta))


@dataclass
class Ledger:
    """The run's DP-SGD plan and what each node has spent: one noise multiplier for every
    node, each node's sampling rate, steps a round and delta (``privacy.delta``, or a tenth of
    1 / its training clips), and its :class:`History`."""

    noise_multiplier: float
    rates: dict[int, float]
    steps: dict[int, int]
    deltas: dict[int, float]
    accountant: str = "rdp"
    histories: dict[int, History] = field(default_factory=dict)
    rounds_done: int = 0

    def planned(self, rounds: int) -> dict[int, float]:
        """Each node's epsilon if, after what it has spent, it trained in ``rounds`` more rounds
        (the most it can spend)."""
        out = {}
        for n in self.rates:
            future = History(list(self.histories.get(n, History()).entries))
            future.add(self.noise_multiplier, self.rates[n], self.steps[n] * rounds)
            out[n] = future.epsilon(self.deltas[n], self.accountant)
        return out

    def check(self, rounds: int, target_epsilon: float | None) -> None:
        """Raise ConfigError when a node could spend more than ``target_epsilon`` in ``rounds``
        more rounds."""
        if target_epsilon is None or rounds <= 0:
            return
        worst, node = max((e, n) for n, e in self.planned(rounds).items())
        if worst > target_epsilon:
            raise ConfigError(
                f"privacy.target_epsilon={target_epsilon:g}: node {node} would spend epsilon "
                f"{worst:.3g} by the end of the run at privacy.noise_multiplier="
                f"{self.noise_multiplier:g}; raise the noise, or lower federation.rounds or "
                "federation.local_epochs")

    def spend(self, node: int) -> None:
        """Node ``node`` trained one round."""
        self.histories.setdefault(node, History()).add(self.noise_multiplier, self.rates[node],
                                                       self.steps[node])

    def metrics(self) -> dict[str, float]:
        """``privacy/epsilon/node{i}`` spent so far by every node that trained, their maximum
        ``privacy/epsilon`` and ``privacy/noise_multiplier``."""
        spent = {n: h.epsilon(self.deltas[n], self.accountant)
                 for n, h in sorted(self.histories.items())}
        out = {f"privacy/epsilon/node{n}": e for n, e in spent.items()}
        out["privacy/epsilon"] = max(spent.values(), default=0.0)
        out["privacy/noise_multiplier"] = self.noise_multiplier
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"rounds_done": self.rounds_done,
                "nodes": {str(n): [list(e) for e in h.entries]
                          for n, h in self.histories.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds_done = int(state["rounds_done"])
        self.histories = {int(n): History([tuple(e) for e in entries])
                          for n, entries in state["nodes"].items()}


def plan(rows: dict[int, int], batch_size: int, epochs: int, rounds: int,
         noise_multiplier: float | None, target_epsilon: float | None, delta: float | None,
         accountant: str) -> Ledger:
    """The ledger of a run whose nodes hold ``rows`` training clips: the noise multiplier given,
    or the smallest that keeps every node within ``target_epsilon`` over all ``rounds``.
    Raises ConfigError when a node's planned epsilon exceeds ``target_epsilon``."""
    rates = {n: min(1.0, batch_size / r) for n, r in rows.items()}
    steps = {n: epochs * -(-r // batch_size) for n, r in rows.items()}
    deltas = {n: delta if delta is not None else 0.1 / r for n, r in rows.items()}
    if noise_multiplier is None:
        assert target_epsilon is not None
        noise_multiplier = max(noise_for(target_epsilon, rates[n], steps[n] * rounds, deltas[n],
                                         accountant) for n in rows)
    ledger = Ledger(noise_multiplier, rates, steps, deltas, accountant)
    ledger.check(rounds, target_epsilon)
    return ledger
