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


@dataclass(frozen=True)
class Use:
    """How one of a node's models uses its rows each time it trains with DP-SGD: the Poisson
    sampling rate and the steps."""

    rate: float
    steps: int


def use(rows: int, batch_size: int, epochs: int) -> Use:
    """The DP-SGD use of ``rows`` rows: rate ``batch_size / rows``, ``ceil(rows /
    batch_size)`` steps an epoch."""
    return Use(min(1.0, batch_size / rows) if rows else 0.0, epochs * -(-rows // batch_size))


@dataclass
class Ledger:
    """The run's DP-SGD plan and what each node has spent: one noise multiplier for every node
    and model, each node's adapter use, its generators' uses (each generator models rows no
    other of the node's generators sees), delta (``privacy.delta``, or a tenth of 1 / its
    training clips) and their :class:`History`.

    A node's clip is in its adapter's rows and in one generator's, so the node's epsilon is the
    largest, over its generators, of the adapter's steps composed with that generator's
    (parallel composition over the generators' disjoint rows, sequential with the adapter)."""

    noise_multiplier: float
    adapters: dict[int, Use]
    deltas: dict[int, float]
    generators: dict[int, list[Use]] = field(default_factory=dict)
    accountant: str = "rdp"
    histories: dict[int, History] = field(default_factory=dict)
    generator_histories: dict[int, list[History]] = field(default_factory=dict)
    rounds_done: int = 0

    def _epsilon(self, node: int, adapter: History, generators: list[History]) -> float:
        delta = self.deltas[node]
        if not any(g.entries for g in generators):
            return adapter.epsilon(delta, self.accountant)
        return max(History(adapter.entries + g.entries).epsilon(delta, self.accountant)
                   for g in generators)

    def _future(self, node: int, noise: float, rounds: int, generator_rounds: int
                ) -> tuple[History, list[History]]:
        adapter = History(list(self.histories.get(node, History()).entries))
        if node in self.adapters and rounds > 0:
            adapter.add(noise, self.adapters[node].rate, self.adapters[node].steps * rounds)
        spent = self.generator_histories.get(node, [])
        generators = []
        for g, u in enumerate(self.generators.get(node, [])):
            history = History(list(spent[g].entries) if g < len(spent) else [])
            if generator_rounds > 0 and u.steps:
                history.add(noise, u.rate, u.steps * generator_rounds)
            generators.append(history)
        return adapter, generators

    def planned(self, rounds: int, generator_rounds: int = 0,
                noise: float | None = None) -> dict[int, float]:
        """Each node's epsilon if, after what it has spent, its adapter trained in ``rounds``
        more rounds and its generators in ``generator_rounds`` (the most it can spend), at
        ``noise`` (default: the ledger's)."""
        noise = self.noise_multiplier if noise is None else noise
        nodes = sorted(set(self.adapters) | set(self.generators))
        return {n: self._epsilon(n, *self._future(n, noise, rounds, generator_rounds))
                for n in nodes}

    def check(self, rounds: int, target_epsilon: float | None,
              generator_rounds: int = 0) -> None:
        """Raise ConfigError when a node could spend more than ``target_epsilon`` in ``rounds``
        more rounds (``generator_rounds`` of them training generators)."""
        if target_epsilon is None or max(rounds, generator_rounds) <= 0:
            return
        worst, node = max((e, n) for n, e in self.planned(rounds, generator_rounds).items())
        if worst > target_epsilon:
            raise ConfigError(
                f"privacy.target_epsilon={target_epsilon:g}: node {node} would spend epsilon "
                f"{worst:.3g} by the end of the run at privacy.noise_multiplier="
                f"{self.noise_multiplier:g}; raise the noise, or lower federation.rounds, "
                "federation.local_epochs or generator.training_epochs")

    def spend(self, node: int) -> None:
        """Node ``node``'s adapter trained one round."""
        u = self.adapters[node]
        self.histories.setdefault(node, History()).add(self.noise_multiplier, u.rate, u.steps)

    def spend_generators(self, node: int) -> None:
        """Node ``node``'s generators trained one round."""
        uses = self.generators.get(node, [])
        histories = self.generator_histories.setdefault(node, [History() for _ in uses])
        for history, u in zip(histories, uses, strict=True):
            if u.steps:
                history.add(self.noise_multiplier, u.rate, u.steps)

    def metrics(self) -> dict[str, float]:
        """``privacy/epsilon/node{i}`` spent so far by every node that trained, their maximum
        ``privacy/epsilon`` and ``privacy/noise_multiplier``."""
        nodes = sorted(set(self.histories) | set(self.generator_histories))
        spent = {n: self._epsilon(n, self.histories.get(n, History()),
                                  self.generator_histories.get(n, [])) for n in nodes}
        out = {f"privacy/epsilon/node{n}": e for n, e in spent.items()}
        out["privacy/epsilon"] = max(spent.values(), default=0.0)
        out["privacy/noise_multiplier"] = self.noise_multiplier
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"rounds_done": self.rounds_done,
                "nodes": {str(n): [list(e) for e in h.entries]
                          for n, h in self.histories.items()},
                "generators": {str(n): [[list(e) for e in h.entries] for h in hs]
                               for n, hs in self.generator_histories.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds_done = int(state["rounds_done"])
        self.histories = {int(n): History([tuple(e) for e in entries])
                          for n, entries in state["nodes"].items()}
        self.generator_histories = {
            int(n): [History([tuple(e) for e in entries]) for entries in hs]
            for n, hs in state.get("generators", {}).items()}


def _smallest_noise(ledger: Ledger, rounds: int, generator_rounds: int,
                    target_epsilon: float) -> float:
    """The smallest noise multiplier (to 0.01 in epsilon, Opacus' tolerance) at which no
    node of ``ledger`` spends more than ``target_epsilon``: bisection, as Opacus searches."""
    def worst(noise: float) -> float:
        return max(ledger.planned(rounds, generator_rounds, noise).values())

    low, high = 0.0, 10.0
    while worst(high) > target_epsilon:
        low, high = high, 2 * high
        if high > 1e4:
            raise ConfigError(f"privacy.target_epsilon={target_epsilon:g}: no noise multiplier "
                              "below 1e4 meets it; raise the target or train fewer steps")
    while True:
        middle = (low + high) / 2
        spent = worst(middle)
        if spent > target_epsilon:
            low = middle
        else:
            high = middle
            if spent >= target_epsilon - 0.01:
                return high


def plan(adapters: dict[int, Use], rounds: int, noise_multiplier: float | None,
         target_epsilon: float | None, deltas: dict[int, float], accountant: str,
         generators: dict[int, list[Use]] | None = None, generator_rounds: int = 0) -> Ledger:
    """The ledger of a run whose nodes' adapters train with ``adapters`` uses for ``rounds``
    rounds and their generators with ``generators`` uses in ``generator_rounds`` of them: the
    noise multiplier given, or the smallest that keeps every node within ``target_epsilon``.
    Raises ConfigError when a node's planned epsilon exceeds ``target_epsilon``."""
    ledger = Ledger(noise_multiplier or 0.0, adapters, deltas, generators or {}, accountant)
    if noise_multiplier is None:
        assert target_epsilon is not None
        if not ledger.generators:
            ledger.noise_multiplier = max(
                noise_for(target_epsilon, u.rate, u.steps * rounds, deltas[n], accountant)
                for n, u in adapters.items())
        else:
            ledger.noise_multiplier = _smallest_noise(ledger, rounds, generator_rounds,
                                                      target_epsilon)
    ledger.check(rounds, target_epsilon, generator_rounds)
    return ledger
