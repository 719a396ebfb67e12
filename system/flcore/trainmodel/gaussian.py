"""Closed-form Gaussian generators: the reference floor of every generator study.

:class:`GaussianBank` has :class:`~flcore.trainmodel.generators.GeneratorBank`'s interface, so a
node or the server can use either. Each class of each generator gets its own Gaussian
``N(mean, factor factor^T + diag(scale^2))`` fitted in closed form on that class's rows: a
generator of several classes (unified, per_group) is thus class-aware, and its samples carry
their class without centroids or prompts. Since every class is modelled alone, the granularity
changes the generators' names and count and the order in which classes are drawn, never the
fitted Gaussians.

Covariances (``generator.gaussian_covariance``):

- ``diagonal``: unbiased (n - 1) per-feature variances.
- ``low_rank``: Tipping & Bishop's (1999) maximum-likelihood probabilistic PCA directions
  with a diagonal residual. From the class's sample covariance ``S`` (unbiased; its top
  eigenpairs come from the thin SVD of the centred rows): ``factor = U_r (L_r - s2)^(1/2)``
  with ``s2`` the mean of the ``F - r`` discarded eigenvalues, as in PPCA; then, instead of
  PPCA's isotropic ``s2``, a diagonal residual, what remains of ``diag(S)``:
  ``diag(S) - rowsum(factor^2) >= 0``. The model's per-feature variances are thus exactly the
  sample's, its covariance is ``S`` itself once ``rank >= min(F, n - 1)``, and for data from
  ``A A^T + s2 I`` it is consistent (the population covariance as n grows). A class with at
  most ``rank`` rows simply has ``n - 1`` non-zero directions.

Every variance is floored at :data:`VARIANCE_FLOOR`, so that a class of one row (zero sample
variance) still has a proper Gaussian around its row.

:class:`NoiseBank` (``generator.model=noise``) is the control arm: one diagonal Gaussian fitted to
every row, whatever its class, so its samples carry no class information.
"""

from dataclasses import dataclass

import torch

from flcore.errors import CheckpointError, ConfigError
from flcore.trainmodel.bank_training import EpochLog
from flcore.trainmodel.generators import GeneratorSpec

VARIANCE_FLOOR = 1e-6
COVARIANCES = ("diagonal", "low_rank")


def check_covariance(covariance: str, rank: int, features: int) -> tuple[str, int]:
    """``(covariance, rank)`` as plain values, or a one-line ConfigError: the covariance is
    ``diagonal`` or ``low_rank``, only ``low_rank`` takes a rank, from 1 to the row width."""
    if covariance not in COVARIANCES:
        raise ConfigError(f"generator.gaussian_covariance={covariance}: use one of "
                          f"{', '.join(COVARIANCES)}")
    if covariance == "diagonal":
        if rank != 0:
            raise ConfigError(f"generator.gaussian_rank={rank}: only "
                              "generator.gaussian_covariance=low_rank has a rank; set it to 0")
        return "diagonal", 0
    if not 1 <= rank <= features:
        raise ConfigError(f"generator.gaussian_rank={rank}: "
                          "generator.gaussian_covariance=low_rank needs a rank from 1 to the "
                          f"{features} features of a generator row")
    return "low_rank", rank


def canonical_signs(directions: torch.Tensor) -> torch.Tensor:
    """``directions [F, r]`` with each column's sign flipped so that its largest-magnitude entry
    is positive: an SVD's signs are arbitrary and differ between devices and libraries, and
    the fit should not, so that a seed draws the same samples on CPU and GPU."""
    peak = directions.abs().argmax(0)
    signs = directions.gather(0, peak[None]).sign()
    return directions * torch.where(signs == 0, 1.0, signs)


def fit_gaussian(rows: torch.Tensor, rank: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``mean [F]``, ``scale [F]`` and ``factor [F, rank]`` of one class's rows ``[n, F]``
    (see the module's docstring); computed in float64 so that they match a float64 reference,
    returned in float32."""
    data = rows.double()
    mean = data.mean(0)
    centred = data - mean
    dof = max(len(rows) - 1, 1)
    variance = centred.square().sum(0) / dof
    factor = data.new_zeros(data.shape[1], rank)
    if rank:
        _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
        top = min(rank, len(singular))
        eigen = singular[:top].square() / dof
        width = data.shape[1]
        discarded = (variance.sum() - eigen.sum()) / (width - rank) if rank < width else 0.0
        factor[:, :top] = canonical_signs(vh[:top].T) * (eigen - discarded).clamp(min=0).sqrt()
        variance = (variance - factor.square().sum(1)).clamp(min=0)
    scale = variance.clamp(min=VARIANCE_FLOOR).sqrt()
    return mean.float(), scale.float(), factor.float()


@dataclass
class GaussianModel:
    """The fitted Gaussians, one row per class of the bank (``classes``, generator by
    generator): ``mean [C, F]``, ``scale [C, F]``, ``factor [C, F, r]`` (``r = 0`` for
    ``diagonal``), and ``fitted[i]``, whether class ``classes[i]`` ever had rows. ``k`` is the
    number of generators, as :attr:`VAEGenerator.k` is for a VAE bank."""

    k: int
    classes: list[int]
    mean: torch.Tensor
    scale: torch.Tensor
    factor: torch.Tensor
    fitted: list[bool]
    #: Width of a class condition: none, every draw is already of its class.
    cond: int = 0

    @property
    def features(self) -> int:
        return self.mean.shape[1]


def draw(mean: torch.Tensor, scale: torch.Tensor, factor: torch.Tensor,
         noise: torch.Tensor) -> torch.Tensor:
    """Rows ``mean + scale * e + factor @ z`` for standard normal ``noise = [e, z]``
    ``[m, F + r]``: draws of ``N(mean, factor factor^T + diag(scale^2))``."""
    features = mean.shape[0]
    return mean + noise[:, :features] * scale + noise[:, features:] @ factor.T


class GaussianBank:
    """A node's (or the server's) Gaussian generators, with GeneratorBank's interface."""

    def __init__(self, spec: GeneratorSpec, features: int, covariance: str = "diagonal",
                 rank: int = 0, device: torch.device | str = "cpu") -> None:
        self.covariance, self.rank = check_covariance(covariance, rank, features)
        self.spec = spec
        classes = [c for group in spec.classes for c in group]
        self.model = GaussianModel(
            len(spec.names), classes, torch.zeros(len(classes), features, device=device),
            torch.zeros(len(classes), features, device=device),
            torch.zeros(len(classes), features, self.rank, device=device),
            [False] * len(classes))
        self.trainings = 0
        self.dropped: list[str] = []

    @torch.no_grad()
    def fit(self, x: torch.Tensor, labels: torch.Tensor, prompts: torch.Tensor | None,
            loss: object, rngs: list[torch.Generator], where: str) -> list[EpochLog]:
        """Refit the Gaussian of every class of the bank that has rows in ``x [n, F]``
        (``labels [n]``); a class without rows keeps its earlier fit, if any. ``prompts``,
        ``loss``, ``rngs`` and ``where`` are accepted for GeneratorBank's interface and unused:
        the fit is closed-form, so there are no epochs to log."""
        m = self.model
        for i, c in enumerate(m.classes):
            rows = x[labels == c]
            if len(rows):
                mean, scale, factor = fit_gaussian(rows, self.rank)
                m.mean[i], m.scale[i], m.factor[i] = mean, scale, factor
                m.fitted[i] = True
        self.trainings += 1
        return []

    @torch.no_grad()
    def sample(self, per_class: dict[int, int], prompts: torch.Tensor | None,
               centroids: dict[int, torch.Tensor], rng: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``per_class[c]`` rows of each fitted class ``c`` of the bank, labelled ``c``, class by
        class in the bank's order; classes the bank does not cover or never fitted give none.
        The noise is drawn from ``rng`` (a CPU generator) and then moved to the bank's device,
        so a seed gives the same draws anywhere. ``prompts`` and ``centroids`` are unused:
        each class has its own Gaussian."""
        m = self.model
        device = m.mean.device
        xs, ys = [], []
        for i, c in enumerate(m.classes):
            n = per_class.get(c, 0)
            if n and m.fitted[i]:
                noise = torch.randn(n, m.features + self.rank, generator=rng).to(device)
                xs.append(draw(m.mean[i], m.scale[i], m.factor[i], noise))
                ys.append(torch.full((n,), c, dtype=torch.long, device=device))
        if not xs:
            return (torch.zeros(0, m.features, device=device),
                    torch.zeros(0, dtype=torch.long, device=device))
        return torch.cat(xs), torch.cat(ys)

    def gaussians(self) -> dict:
        """Everything that defines the fitted Gaussians, as plain tensors, lists and strings."""
        m = self.model
        return {"names": list(self.spec.names), "classes": [list(c) for c in self.spec.classes],
                "covariance": self.covariance, "rank": self.rank, "features": m.features,
                "mean": m.mean.clone(), "scale": m.scale.clone(), "factor": m.factor.clone(),
                "fitted": list(m.fitted)}

    def decoder_package(self) -> dict:
        """What ``generator.share=decoder`` sends: each class's mean and covariance factors
        (summary statistics of its rows; a one-row class's mean is that row)."""
        return {**self.gaussians(), "dropped": []}

    @classmethod
    def from_decoder(cls, package: dict, config: object = None,
                     device: torch.device | str = "cpu") -> "GaussianBank":
        """A bank that samples as the sender's would; ``config`` is accepted for
        GeneratorBank's signature and unused (the package holds the whole model)."""
        bank = cls(GeneratorSpec(package["names"], package["classes"]), package["features"],
                   package["covariance"], package["rank"], device)
        bank.load_gaussians(package)
        return bank

    def load_gaussians(self, saved: dict) -> None:
        """Take the Gaussians of ``saved`` (a :meth:`gaussians` dict); refuses, in one line,
        Gaussians of other generators, another covariance or another row width."""
        m = self.model
        theirs = (saved["names"], saved["covariance"], saved["rank"], saved["features"])
        ours = (list(self.spec.names), self.covariance, self.rank, m.features)
        if theirs != ours:
            raise CheckpointError("saved Gaussian generators (names, covariance, rank, "
                                  f"features) are {theirs}; this bank's are {ours}")
        device = m.mean.device
        m.mean, m.scale = saved["mean"].to(device), saved["scale"].to(device)
        m.factor, m.fitted = saved["factor"].to(device), list(saved["fitted"])

    def state_dict(self) -> dict:
        return {**self.gaussians(), "trainings": self.trainings, "dropped": []}

    def load_state_dict(self, state: dict) -> None:
        self.load_gaussians(state)
        self.trainings = state["trainings"]


class NoiseBank(GaussianBank):
    """The control arm of a generator study: every class of the bank gets the same diagonal
    Gaussian, fitted to all the rows it is given (every class pooled), so its samples are
    class-agnostic noise that only the requested counts label. What guarded fine-tuning gains
    from it is the guard's selection on validation, not the generators'."""

    @torch.no_grad()
    def fit(self, x: torch.Tensor, labels: torch.Tensor, prompts: torch.Tensor | None,
            loss: object, rngs: list[torch.Generator], where: str) -> list[EpochLog]:
        """Fit one diagonal Gaussian to every row of ``x [n, F]`` and give it to each class of
        the bank that has rows in ``labels [n]``; the other arguments as
        :meth:`GaussianBank.fit`'s."""
        m = self.model
        present = [i for i, c in enumerate(m.classes) if bool((labels == c).any())]
        if present:
            mean, scale, _ = fit_gaussian(x, 0)
            m.mean[present], m.scale[present] = mean, scale
            for i in present:
                m.fitted[i] = True
        self.trainings += 1
        return []
