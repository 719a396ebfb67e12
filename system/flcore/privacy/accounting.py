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
