"""The VAE of audio embeddings: ``K`` stacked generators (:class:`VAEGenerator`), their loss
(:class:`VAELoss`, the negative ELBO with a calibrated Gaussian decoder, Rybkin et al. 2021) and
the schedule of its KL weight (:class:`BetaScheduler`, built by :func:`beta_schedule`)."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flcore.config import (
    BetaSchedule,
    DecoderVariance,
    GeneratorConfig,
    KlReduction,
    Likelihood,
    ScheduleScope,
)


def warmup_epochs(total_epochs: int, ratio: float) -> int:
    """``max(1, ceil(total_epochs * ratio))`` with a tolerance, so that 10 * 0.3 gives 3."""
    return max(1, math.ceil(total_epochs * ratio - 1e-9))


@dataclass(frozen=True)
class BetaScheduler:
    """The KL weight of 0-based schedule ``epoch`` (of ``total_epochs``; a training starts at
    ``first_epoch``):

    - ``linear``: ``beta_max * min(1, (epoch + 1) / warmup_epochs)``.
    - ``cyclical`` (Fu et al. 2019): ``n_cycles`` cycles of ``P = ceil(total / n_cycles)``
      epochs; within a cycle ``tau = (epoch mod P + 1) / P`` and
      ``beta = beta_max * min(1, tau / cycle_ratio)``.
    - ``sigmoid``: ``beta_max * sigmoid(12 * ((epoch + 1) / warmup_epochs - 0.5))`` during the
      warm-up, ``beta_max`` after it.
    - ``constant``: ``beta_max``.
    """

    schedule: BetaSchedule
    total_epochs: int
    warmup_ratio: float
    beta_max: float = 1.0
    n_cycles: int = 4
    cycle_ratio: float = 0.5
    first_epoch: int = 0

    @property
    def warmup(self) -> int:
        return warmup_epochs(self.total_epochs, self.warmup_ratio)

    def __call__(self, epoch: int) -> float:
        step = epoch + 1
        if self.schedule is BetaSchedule.constant:
            return self.beta_max
        if self.schedule is BetaSchedule.cyclical:
            period = math.ceil(self.total_epochs / self.n_cycles)
            tau = (epoch % period + 1) / period
            return self.beta_max * min(1.0, tau / self.cycle_ratio)
        if step >= self.warmup:
            return self.beta_max
        if self.schedule is BetaSchedule.sigmoid:
            return self.beta_max / (1 + math.exp(-12 * (step / self.warmup - 0.5)))
        return self.beta_max * step / self.warmup


def beta_schedule(config: GeneratorConfig, *, rounds: int, round_: int) -> BetaScheduler:
    """The beta schedule of round ``round_``'s (1-based) generator training in a run of
    ``rounds`` rounds. ``per_round``: ``training_epochs`` long, from epoch 0 every training.
    ``whole_run``: as long as the run's generator rounds (every ``train_every``-th) together,
    each training starting after the epochs of every generator round before it, whether or not
    a node trained in them, so that a node first sampled late still reaches ``beta_max`` when
    the warm-up ends."""
    epochs = config.training_epochs
    if config.schedule_scope is ScheduleScope.per_round:
        total, first = epochs, 0
    else:
        total = epochs * (rounds // config.train_every)
        first = (round_ - 1) // config.train_every * epochs
    return BetaScheduler(config.beta_schedule, total, config.beta_warmup_ratio, config.beta_max,
                         config.n_cycles, config.cycle_ratio, first)


@dataclass
class VAELossTerms:
    """Per-generator loss terms ``[K]``: ``recon`` is the reconstruction term optimized (the MSE
    or the Gaussian NLL), ``kl`` the (free-bits) KL term, ``mse`` the mean squared error of every
    likelihood (one scale to compare them on), ``similarity`` the mean ``1 - cosine``,
    ``sigma2`` the decoder variance the reconstruction term uses (or implies) and
    ``effective_beta`` the KL weight relative to the negative ELBO at the maximum-likelihood
    variance (:func:`effective_beta`)."""

    total: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    similarity: torch.Tensor
    mse: torch.Tensor
    beta: float
    sigma2: torch.Tensor
    effective_beta: torch.Tensor

    @property
    def weighted_kl(self) -> torch.Tensor:
        return self.beta * self.kl


def gaussian_nll(squared_error: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
    """``-log N(x; x_hat, sigma^2)`` summed over the last axis, from ``(x - x_hat)^2`` and one
    shared ``log sigma^2`` per generator (broadcast ``[K, 1, 1]``): the calibrated decoder of the
    sigma-VAE (Rybkin et al. 2021)."""
    terms = squared_error * (-log_variance).exp() + log_variance + math.log(2 * math.pi)
    return 0.5 * terms.sum(-1)


def effective_beta(beta: float, sigma2: torch.Tensor,
                   mse: torch.Tensor) -> torch.Tensor:
    """The KL weight relative to the reconstruction, on the scale of the negative ELBO at the
    maximum-likelihood decoder variance ``sigma^2 = mse`` (Rybkin et al. 2021): a loss
    ``D/(2 s^2) mse + beta KL`` is that ELBO's ``D/(2 mse) mse + beta (s^2/mse) KL`` rescaled,
    so its effective beta is ``beta s^2 / mse``."""
    return beta * sigma2 / mse.clamp(min=torch.finfo(mse.dtype).tiny)


class VAELoss(nn.Module):
    """The negative ELBO of ``K`` generators: reconstruction + beta(epoch) x KL.

    - ``likelihood=mse``: reconstruction is the MSE averaged over the features, plus
      ``similarity_weight x (1 - cosine)``. It equals the Gaussian NLL of variance ``D/2`` (D
      features) up to a constant, so its effective beta is ``beta D / (2 mse)``: with a KL
      summed over latent dimensions, posterior collapse is the optimum.
    - ``likelihood=gaussian`` (sigma-VAE, Rybkin et al. 2021): reconstruction is the Gaussian
      NLL summed over the features, with one shared variance per generator.
      ``decoder_variance=optimal`` (their optimal sigma) sets it to the generator's current
      reconstruction MSE over its own real rows of the minibatch (detached, floored at
      ``variance_floor``): the NLL is then ``D/2 (log(2 pi sigma^2) + 1)``, the ELBO at the
      maximum-likelihood sigma, and ``beta`` means what it says at every step (``beta = 1`` is
      that negative ELBO). ``learned`` uses the decoders' log-variances ``recon_logvar``
      (clamped at ``log(variance_floor)``), a parameter with its own learning rate; its
      effective beta is ``beta sigma^2 / mse``. No similarity term is added (it is no
      log-likelihood and would break the bound); it is still returned as a diagnostic.

    The KL of latent dimension ``j`` is averaged over each generator's real rows, then floored
    at ``free_bits`` nats (Kingma et al. 2016: ``sum_j max(free_bits, KL_j)``), then summed
    (``kl_reduction=sum``) or averaged over dimensions; its weight follows ``beta``. Inputs
    carry a leading generator axis ``[K, B, ...]`` and a mask ``[K, B]`` of real rows; each
    generator's terms are means over its own rows. :func:`vae_loss` builds the configured one.
    """

    def __init__(self, beta: BetaScheduler, *, likelihood: Likelihood = Likelihood.mse,
                 decoder_variance: DecoderVariance = DecoderVariance.optimal,
                 kl_reduction: KlReduction = KlReduction.sum, similarity_weight: float = 0.1,
                 variance_floor: float = 1e-4, free_bits: float = 0.0) -> None:
        super().__init__()
        self.beta = beta
        self.kl_reduction = kl_reduction
        self.similarity_weight = similarity_weight
        self.likelihood = likelihood
        self.variance_floor = variance_floor
        self.log_variance_floor = math.log(variance_floor)
        self.free_bits = free_bits
        self.decoder_variance = decoder_variance

    def forward(self, recon: torch.Tensor, x: torch.Tensor, mu: torch.Tensor,
                logvar: torch.Tensor, epoch: int, mask: torch.Tensor,
                recon_logvar: torch.Tensor | None = None) -> VAELossTerms:
        """Terms of reconstructions ``recon`` of ``x``, posteriors ``N(mu, exp(logvar))`` and,
        for a ``learned`` decoder variance, the decoders' log-variances ``recon_logvar [K, 1, 1]``,
        at 0-based schedule epoch ``epoch``."""
        weight = mask.to(x.dtype)
        count = weight.sum(1).clamp(min=1)

        def per_generator(values: torch.Tensor) -> torch.Tensor:
            return (values * weight).sum(1) / count

        squared_error = ((recon - x) ** 2).flatten(2)
        mse = per_generator(squared_error.mean(-1))
        kl_per_dim = -0.5 * (1 + logvar - mu**2 - logvar.exp())
        kl_per_dim = (kl_per_dim * weight[..., None]).sum(1) / count[:, None]
        if self.free_bits > 0:
            kl_per_dim = kl_per_dim.clamp(min=self.free_bits)
        kl = kl_per_dim.sum(-1) if self.kl_reduction is KlReduction.sum else kl_per_dim.mean(-1)
        similarity = per_generator(1 - F.cosine_similarity(recon.flatten(2), x.flatten(2),
                                                            dim=-1))
        beta = self.beta(epoch)
        if self.likelihood is Likelihood.mse:
            total = mse + beta * kl + self.similarity_weight * similarity
            implied = torch.full_like(mse, squared_error.shape[-1] / 2)
            return VAELossTerms(total, mse, kl, similarity, mse, beta, implied,
                                effective_beta(beta, implied, mse.detach()))
        log_sigma2 = self.log_sigma2(mse, recon_logvar)
        nll = per_generator(gaussian_nll(squared_error, log_sigma2.view(-1, 1, 1)))
        sigma2 = log_sigma2.detach().exp()
        return VAELossTerms(nll + beta * kl, nll, kl, similarity, mse, beta, sigma2,
                            effective_beta(beta, sigma2, mse.detach()))

    def log_sigma2(self, mse: torch.Tensor, recon_logvar: torch.Tensor | None) -> torch.Tensor:
        """Each generator's decoder ``log sigma^2 [K]``, floored at ``log(variance_floor)``: the
        optimal sigma of Rybkin et al. 2021 (``mse`` over the generator's real rows, detached,
        so no gradient moves it) or the learned ``recon_logvar``."""
        if self.decoder_variance is DecoderVariance.optimal:
            return mse.detach().clamp(min=self.variance_floor).log()
        if recon_logvar is None:
            raise ValueError("decoder_variance=learned needs the decoders' log-variances "
                             "(a VAEGenerator with learned_variance=True)")
        return recon_logvar.flatten().clamp(min=self.log_variance_floor)


class StackedLinear(nn.Module):
    """K independent linear layers, weights ``[K, in, out]``, applied with one batched matmul."""

    def __init__(self, k: int, fan_in: int, fan_out: int) -> None:
        super().__init__()
        bound = 1 / math.sqrt(fan_in)
        self.weight = nn.Parameter(torch.empty(k, fan_in, fan_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(k, 1, fan_out).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class VAEGenerator(nn.Module):
    """``K`` VAEs of flattened ``[S, D]`` embeddings, optionally conditioned on a prompt (CVAE).

    ``x [K, B, S*D]`` -> encoder -> ``mu, logvar [K, B, Z]`` -> ``z = mu + sigma * noise`` ->
    decoder -> ``[K, B, S*D]``. Generator ``k``'s weights are slice ``k`` of every parameter.
    With ``learned_variance`` each decoder also has one shared log-variance ``dec_logvar
    [K, 1, 1]`` for the Gaussian likelihood of the sigma-VAE (Rybkin et al. 2021; a generator's
    first training starts it at its rows' variance, :func:`start_learned_variance`). The buffer
    ``dec_sigma2 [K, 1, 1]`` holds each decoder's variance as of its last training
    (:meth:`~flcore.trainmodel.generators.GeneratorBank.keep_decoder_variance`), the noise of
    ``sample(..., noise=True)``; both belong to the decoder (and its package).
    """

    def __init__(self, k: int, features: int, hidden: int, latent: int, cond: int = 0,
                 learned_variance: bool = False) -> None:
        super().__init__()
        self.k, self.features, self.latent, self.cond = k, features, latent, cond
        self.enc = StackedLinear(k, features + cond, hidden)
        self.enc_out = StackedLinear(k, hidden, 2 * latent)
        self.dec = StackedLinear(k, latent + cond, hidden)
        self.dec_out = StackedLinear(k, hidden, features)
        self.dec_logvar = nn.Parameter(torch.zeros(k, 1, 1)) if learned_variance else None
        self.register_buffer("dec_sigma2", torch.zeros(k, 1, 1))

    def _with(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return x if cond is None else torch.cat([x, cond], dim=-1)

    def encode(self, x: torch.Tensor, cond: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.enc_out(F.gelu(self.enc(self._with(x, cond)))).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.dec_out(F.gelu(self.dec(self._with(z, cond))))

    def forward(self, x: torch.Tensor, noise: torch.Tensor, cond: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x, cond)
        z = mu + (0.5 * logvar).exp() * noise
        return self.decode(z, cond), mu, logvar

    @torch.no_grad()
    def sample(self, n: int, cond: torch.Tensor | None = None,
               generator: torch.Generator | None = None, noise: bool = False) -> torch.Tensor:
        """``n`` draws from each generator's prior: ``[K, n, features]``, the decoder means, or
        with ``noise`` draws of the decoder's Gaussian ``mean + sqrt(dec_sigma2) * eps``, ``eps``
        drawn from ``generator`` right after the latents."""
        device = self.enc.weight.device
        z = torch.randn(self.k, n, self.latent, generator=generator, device="cpu").to(device)
        mean = self.decode(z, cond)
        if not noise:
            return mean
        eps = torch.randn(self.k, n, self.features, generator=generator, device="cpu")
        return mean + self.dec_sigma2.sqrt() * eps.to(device)


def vae_loss(config: GeneratorConfig, *, rounds: int, round_: int) -> VAELoss:
    """The configured VAE loss of round ``round_``'s generator training in a run of ``rounds``
    rounds (its beta schedule: :func:`beta_schedule`)."""
    return VAELoss(beta_schedule(config, rounds=rounds, round_=round_),
                   likelihood=config.likelihood, decoder_variance=config.decoder_variance,
                   kl_reduction=config.kl_reduction, similarity_weight=config.similarity_weight,
                   variance_floor=config.variance_floor, free_bits=config.free_bits)
