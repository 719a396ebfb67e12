"""Banks of VAE generators (:mod:`flcore.trainmodel.vae`): a node's (or the server's)
generators, one unified, one per class or one per group, in one module whose weights are stacked
along a leading generator axis ``K``; what they draw and what a node shares. Their training is
:mod:`flcore.trainmodel.bank_training`."""

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flcore.config import DecoderVariance, GeneratorConfig, Granularity, Likelihood
from flcore.trainmodel.bank_training import EpochLog, GeneratorData, bank_optimizer, train_banks
from flcore.trainmodel.vae import VAEGenerator, VAELoss

log = logging.getLogger(__name__)


@dataclass
class GeneratorSpec:
    """Which classes (dataset ids) each of a node's generators models, and the generators'
    names (``all``, a class name, or a group name)."""

    names: list[str]
    classes: list[list[int]]


def generator_spec(class_ids: list[int], class_names: list[str], granularity: Granularity,
                   class_groups: dict[str, list[str]]) -> GeneratorSpec:
    """One generator for all classes, one per class, or one per group (classes in no group form
    the group ``other``); groups without any of ``class_ids`` get no generator."""
    if granularity is Granularity.unified:
        return GeneratorSpec(["all"], [list(class_ids)])
    if granularity is Granularity.per_class:
        return GeneratorSpec([class_names[c] for c in class_ids], [[c] for c in class_ids])
    names, classes, grouped = [], [], set()
    for group, members in class_groups.items():
        ids = [c for c in class_ids if class_names[c] in members]
        grouped.update(ids)
        if ids:
            names.append(group)
            classes.append(ids)
    rest = [c for c in class_ids if c not in grouped]
    if rest:
        names.append("other")
        classes.append(rest)
    return GeneratorSpec(names, classes)


class GeneratorBank:
    """A node's (or the server's) generators with their optimizer state, kept between rounds."""

    def __init__(self, spec: GeneratorSpec, features: int, config: GeneratorConfig,
                 cond_dim: int, device: torch.device) -> None:
        self.spec, self.config = spec, config
        self.model = VAEGenerator(len(spec.names), features, config.hidden_dim, config.latent_dim,
                                  cond_dim, config.decoder_variance is DecoderVariance.learned
                                  ).to(device)
        self.optimizer = bank_optimizer(self.model, config)
        self.trainings = 0
        self.dropped: list[str] = []

    def data(self, x: torch.Tensor, labels: torch.Tensor,
             prompts: torch.Tensor | None) -> GeneratorData:
        """Each generator's rows of ``x`` (padded) and, for a CVAE, their class prompts."""
        rows = [torch.isin(labels, torch.tensor(c, device=labels.device)).nonzero().flatten()
                for c in self.spec.classes]
        counts = torch.tensor([len(r) for r in rows])
        width = max(int(counts.max()), 1)
        padded = torch.zeros(len(rows), width, dtype=torch.long, device=x.device)
        for g, r in enumerate(rows):
            padded[g, : len(r)] = r
        cond = None if prompts is None else prompts[labels[padded]]
        return GeneratorData(x[padded], counts, cond)

    def fit(self, x: torch.Tensor, labels: torch.Tensor, prompts: torch.Tensor | None,
            loss: VAELoss, rngs: list[torch.Generator], where: str) -> list[EpochLog]:
        """``generator.training_epochs`` epochs on rows ``x [n, F]`` with class ids ``labels``."""
        return train_banks([self], [x], [labels], [prompts], loss, [rngs], [where])[0]

    @property
    def names(self) -> list[str]:
        """The generators' names, in stack order."""
        return self.spec.names

    def shape(self) -> tuple[int, int, int, int, bool]:
        """``(features, hidden, latent, cond, learned variance)``: banks of one shape can train
        as one stacked model."""
        m = self.model
        return (m.features, m.enc.weight.shape[-1], m.latent, m.cond, m.dec_logvar is not None)

    def end_training(self, last: EpochLog, dropped: list[bool], where: str) -> None:
        """Book a training that ended with epoch ``last``: the generators ``dropped`` (a
        non-finite loss stopped them; a generator without rows this time is only idle), the
        decoder variances, and a warning for each at the variance floor."""
        self.dropped += [name for name, out in zip(self.spec.names, dropped, strict=True) if out]
        self.trainings += 1
        self.keep_decoder_variance(last)
        self._warn_at_variance_floor(where, last)

    @torch.no_grad()
    def keep_decoder_variance(self, last: EpochLog) -> None:
        """Store the decoder variance of each generator that had rows in the ``last`` epoch
        (``model.dec_sigma2``, the noise of ``generator.sample_noise``): the learned one
        (``exp(dec_logvar)``, floored as the loss floors it), the optimal one
        (``exp(last.log_sigma2)``, the epoch's mean calibrated sigma^2) or, under
        ``likelihood=mse``, the epoch's mean reconstruction MSE (its maximum-likelihood
        variance). Idle generators keep theirs."""
        m = self.model
        if m.dec_logvar is not None:
            floor = math.log(self.config.variance_floor)
            value = m.dec_logvar.clamp(min=floor).exp().flatten()
        elif self.config.likelihood is Likelihood.gaussian:
            value = last.log_sigma2.exp()
        else:
            value = last.mse
        trained = last.log_sigma2.isfinite().to(m.dec_sigma2.device)
        kept = torch.where(trained, value.to(m.dec_sigma2), m.dec_sigma2.flatten())
        m.dec_sigma2.copy_(kept.view_as(m.dec_sigma2))

    def _warn_at_variance_floor(self, where: str, last: EpochLog) -> None:
        """Name each trained generator whose decoder variance sat at ``generator.variance_floor``
        in the ``last`` epoch (``likelihood=gaussian``): its reconstructions are (near) exact,
        e.g. identical or memorized rows, and its NLL is no longer a calibrated likelihood."""
        if self.config.likelihood is not Likelihood.gaussian:
            return
        floor = math.log(self.config.variance_floor) + 1e-6
        at_floor = (last.log_sigma2 <= floor).tolist()
        for name, low in zip(self.spec.names, at_floor, strict=True):
            if low and name not in self.dropped:
                log.warning("%sgenerator %s: the decoder variance is at "
                            "generator.variance_floor=%g (near-exact reconstructions: identical "
                            "or memorized rows?)", where, name, self.config.variance_floor)

    @torch.no_grad()
    def sample(self, per_class: dict[int, int], prompts: torch.Tensor | None,
               centroids: dict[int, torch.Tensor], rng: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``per_class[c]`` synthetic rows of each class and their labels. A generator of one
        class, or a conditional one, draws each class directly; an unconditional generator of
        several classes draws their total and labels each draw by the nearest class centroid.
        Draws are decoder means, or with ``generator.sample_noise`` draws of the decoder's
        Gaussian (:meth:`VAEGenerator.sample`). Classes absent from ``per_class`` (no node holds
        them this round) get no draws."""
        self.model.eval()
        xs, ys = [], []
        device = self.model.enc.weight.device
        noise = self.config.sample_noise
        for g, (name, covered) in enumerate(zip(self.spec.names, self.spec.classes,
                                                strict=True)):
            classes = [c for c in covered if per_class.get(c, 0) > 0]
            if name in self.dropped or not classes:
                continue
            one = slice_generator(self.model, g)
            if len(classes) == 1 or prompts is not None:
                for c in classes:
                    cond = None if prompts is None else prompts[c].expand(1, per_class[c], -1)
                    xs.append(one.sample(per_class[c], cond, rng, noise)[0])
                    ys.append(torch.full((per_class[c],), c, device=device))
            else:
                draws = one.sample(sum(per_class[c] for c in classes), None, rng, noise)[0]
                table = torch.stack([centroids[c] for c in classes])
                xs.append(draws)
                ys.append(torch.tensor(classes, device=device)[torch.cdist(draws, table)
                                                               .argmin(1)])
        self.model.train()
        if not xs:
            return (torch.zeros(0, self.model.features, device=device),
                    torch.zeros(0, dtype=torch.long, device=device))
        return torch.cat(xs), torch.cat(ys)

    def decoder_package(self) -> dict:
        """What ``generator.share=decoder`` sends: the decoders and the generators' classes."""
        decoder = {k: v.detach().clone() for k, v in self.model.state_dict().items()
                   if k.startswith("dec")}
        return {"names": list(self.spec.names), "classes": [list(c) for c in self.spec.classes],
                "decoder": decoder, "dropped": list(self.dropped),
                "shape": [self.model.features, self.config.hidden_dim, self.model.latent,
                          self.model.cond]}

    @classmethod
    def from_decoder(cls, package: dict, config: GeneratorConfig,
                     device: torch.device) -> "GeneratorBank":
        """A bank that can sample from received decoders (its encoders are never used)."""
        features, _, _, cond = package["shape"]
        bank = cls(GeneratorSpec(package["names"], package["classes"]), features, config, cond,
                   device)
        bank.model.load_state_dict(package["decoder"], strict=False)
        bank.dropped = list(package["dropped"])
        return bank

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "trainings": self.trainings, "dropped": list(self.dropped),
                "names": list(self.spec.names)}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.trainings, self.dropped = state["trainings"], list(state["dropped"])


@dataclass
class SyntheticShare:
    """What a node sends after training its generators: samples ``x [m, F]`` with class ids
    ``y``, or (``decoder``) its decoders, from which the server draws ``counts[c]`` per class
    with ``rng`` (seeded as the node would have)."""

    node: int
    counts: dict[int, int]
    rng: torch.Generator
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    decoder: dict | None = None


def slice_generator(model: VAEGenerator, g: int) -> VAEGenerator:
    """Generator ``g`` of a bank as a one-generator module sharing its weights."""
    one = VAEGenerator(1, model.features, model.enc.weight.shape[-1], model.latent, model.cond,
                       model.dec_logvar is not None)
    one.to(model.enc.weight.device)
    for param, source in zip(one.parameters(), model.parameters(), strict=True):
        param.data = source.data[g : g + 1]
    for buffer, source in zip(one.buffers(), model.buffers(), strict=True):
        buffer.data = source.data[g : g + 1]
    return one


def generator_rows(tokens: torch.Tensor, sequence_length: int) -> torch.Tensor:
    """Cached tokens ``[n, L, D]`` pooled to ``[n, sequence_length, D]`` and flattened (also for
    n = 0: a node class without held-out clips)."""
    pooled = F.adaptive_avg_pool1d(tokens.transpose(1, 2), sequence_length).transpose(1, 2)
    return pooled.flatten(1)
