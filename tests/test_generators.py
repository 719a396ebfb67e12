"""Beta schedules, the VAE loss, stacked optimizers, and batched generator training."""

import copy
import dataclasses
import itertools
import logging
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from omegaconf import DictConfig
from torch.distributions import Normal, kl_divergence

from flcore.config import (
    BetaSchedule,
    DecoderVariance,
    GeneratorConfig,
    KlReduction,
    Likelihood,
    OnNan,
    Precision,
    ScheduleScope,
    validate,
)
from flcore.errors import ConfigError, TrainingError
from flcore.trainmodel.bank_training import (
    GeneratorData,
    start_learned_variance,
    train_banks,
    train_generators,
)
from flcore.trainmodel.banks import fit_together
from flcore.trainmodel.generators import GeneratorBank, GeneratorSpec, slice_generator
from flcore.trainmodel.optim import NonFiniteFlags, StackedAdam, clip_per_model
from flcore.trainmodel.vae import (
    BetaScheduler,
    VAEGenerator,
    VAELoss,
    beta_schedule,
    vae_loss,
    warmup_epochs,
)

#: The unit tests' reference generator: the true ELBO (beta_max 1) and decoder-mean samples, so
#: their closed forms need no default of the run config.
UNIT = {"beta_max": 1.0, "sample_noise": False}

def linear(total: int, ratio: float) -> BetaScheduler:
    return BetaScheduler(BetaSchedule.linear, total, ratio)


def test_ten_epochs_half_warmup() -> None:
    betas = [linear(10, 0.5)(e) for e in range(10)]
    assert betas == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])


def test_fifty_epochs_half_warmup() -> None:
    s = linear(50, 0.5)
    for epoch, beta in [(1, 0.04), (5, 0.20), (10, 0.40), (15, 0.60), (20, 0.80), (25, 1.0)]:
        assert s(epoch - 1) == pytest.approx(beta)
    assert all(s(e - 1) == 1.0 for e in range(25, 51))


def test_hundred_epochs_half_warmup() -> None:
    s = linear(100, 0.5)
    for epoch, beta in [(1, 0.02), (10, 0.20), (25, 0.50), (50, 1.0)]:
        assert s(epoch - 1) == pytest.approx(beta)
    assert all(s(e - 1) == 1.0 for e in range(50, 101))


@pytest.mark.parametrize(("ratio", "full_at"), [(0.25, 3), (0.5, 5), (0.75, 8), (1.0, 10)])
def test_ten_epochs_reach_full_beta_at(ratio: float, full_at: int) -> None:
    s = linear(10, ratio)
    assert s(full_at - 1) == 1.0
    assert s(full_at - 2) < 1.0


def test_warmup_rounds_up_with_a_tolerance() -> None:
    assert warmup_epochs(10, 0.3) == 3
    assert warmup_epochs(10, 0.25) == 3
    assert warmup_epochs(3, 0.1) == 1
    assert linear(10, 0.5).warmup == 5


def test_beta_max_scales_the_schedule() -> None:
    s = BetaScheduler(BetaSchedule.linear, 10, 0.5, beta_max=0.5)
    assert s(0) == pytest.approx(0.1) and s(9) == 0.5


def test_cyclical_sigmoid_constant() -> None:
    cyc = BetaScheduler(BetaSchedule.cyclical, 8, 0.5, n_cycles=2, cycle_ratio=0.5)
    assert [cyc(e) for e in range(8)] == pytest.approx([0.5, 1, 1, 1, 0.5, 1, 1, 1])
    sig = BetaScheduler(BetaSchedule.sigmoid, 10, 0.5)
    values = [sig(e) for e in range(10)]
    assert values[2] == pytest.approx(1 / (1 + math.exp(-12 * (3 / 5 - 0.5))))
    assert all(a < b for a, b in itertools.pairwise(values[:5]))
    assert values[4:] == [1.0] * 6
    assert BetaScheduler(BetaSchedule.constant, 10, 0.5, beta_max=0.3)(0) == 0.3


def test_vae_loss_terms_match_closed_forms() -> None:
    torch.manual_seed(0)
    x, recon = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    mu, logvar = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    loss = VAELoss(linear(10, 0.5), similarity_weight=0.1, likelihood=Likelihood.mse)
    ignored = torch.full((2, 1, 1), 3.0)
    terms = loss(recon, x, mu, logvar, epoch=1, mask=mask, recon_logvar=ignored)
    for g, n in ((0, 2), (1, 3)):
        mse = ((recon[g, :n] - x[g, :n]) ** 2).mean()
        kl = (-0.5 * (1 + logvar[g, :n] - mu[g, :n] ** 2 - logvar[g, :n].exp())).sum(-1).mean()
        sim = (1 - torch.cosine_similarity(recon[g, :n], x[g, :n], dim=-1)).mean()
        torch.testing.assert_close(terms.recon[g], mse)
        torch.testing.assert_close(terms.kl[g], kl)
        torch.testing.assert_close(terms.similarity[g], sim)
        torch.testing.assert_close(terms.total[g], mse + 0.4 * kl + 0.1 * sim)
        torch.testing.assert_close(terms.mse[g], mse)
    assert terms.beta == pytest.approx(0.4)
    mean_kl = VAELoss(linear(10, 0.5), kl_reduction=KlReduction.mean)(recon, x, mu, logvar, 1, mask)
    torch.testing.assert_close(mean_kl.kl, terms.kl / 4)


def test_kl_is_zero_at_the_prior() -> None:
    zeros = torch.zeros(1, 2, 3)
    terms = VAELoss(linear(1, 1.0))(zeros, zeros + 1, zeros, zeros, 0, torch.ones(1, 2, dtype=bool))
    assert terms.kl.item() == 0.0


def test_gaussian_likelihood_with_a_learned_variance_is_the_negative_elbo() -> None:
    """``likelihood=gaussian``, ``decoder_variance=learned``: recon is ``-log N(x; x_hat,
    sigma^2)`` summed over the features (``[S, D]`` flattened) and averaged over each
    generator's real rows, with the learned sigma^2 floored at ``variance_floor``; KL is
    ``KL(q(z|x) || N(0, I))`` summed over latent dimensions; total = recon + beta x KL, with no
    similarity term; the effective beta is ``beta sigma^2 / mse``."""
    torch.manual_seed(0)
    x, recon = torch.randn(3, 4, 2, 5), torch.randn(3, 4, 2, 5)
    mu, logvar = torch.randn(3, 4, 6), torch.randn(3, 4, 6)
    recon_logvar = torch.tensor([-1.0, 0.5, -20.0]).view(3, 1, 1)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    loss = VAELoss(linear(10, 0.5), similarity_weight=0.1, likelihood=Likelihood.gaussian,
                   variance_floor=1e-4, decoder_variance=DecoderVariance.learned)
    terms = loss(recon, x, mu, logvar, epoch=1, mask=mask, recon_logvar=recon_logvar)
    for g, n in enumerate((2, 4, 1)):
        sigma = max(math.exp(recon_logvar[g].item()), 1e-4) ** 0.5
        nll = -Normal(recon[g, :n].flatten(1), sigma).log_prob(x[g, :n].flatten(1)).sum(-1).mean()
        posterior = Normal(mu[g, :n], (0.5 * logvar[g, :n]).exp())
        kl = kl_divergence(posterior, Normal(0.0, 1.0)).sum(-1).mean()
        torch.testing.assert_close(terms.recon[g], nll)
        torch.testing.assert_close(terms.kl[g], kl)
        torch.testing.assert_close(terms.total[g], nll + 0.4 * kl)
        torch.testing.assert_close(terms.mse[g], ((recon[g, :n] - x[g, :n]) ** 2).mean())
        sim = (1 - torch.cosine_similarity(recon[g, :n].flatten(1), x[g, :n].flatten(1))).mean()
        torch.testing.assert_close(terms.similarity[g], sim)
        torch.testing.assert_close(terms.sigma2[g], torch.tensor(sigma**2))
        torch.testing.assert_close(terms.effective_beta[g], 0.4 * sigma**2 / terms.mse[g])
    with pytest.raises(ValueError, match="learned_variance"):
        loss(recon, x, mu, logvar, epoch=1, mask=mask)


def test_optimal_sigma_is_each_generators_masked_mse_and_the_loss_its_closed_form() -> None:
    """``decoder_variance=optimal`` (Rybkin et al. 2021): each generator's sigma^2 is the MSE of
    its own real rows of the minibatch (padding rows are left out), floored at
    ``variance_floor``; the NLL is then ``D/2 (log(2 pi sigma^2) + 1)`` and the total that plus
    beta x KL; the effective beta is beta; padded rows get no gradient. Generator 2 reconstructs
    better than the floor: its NLL keeps the floored sigma and its effective beta exceeds beta."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4, 2, 5))
    recon = x + rng.normal(size=x.shape) * np.array([1.0, 0.3, 0.001])[:, None, None, None]
    mu, logvar = rng.normal(size=(3, 4, 6)), rng.normal(size=(3, 4, 6)) * 0.5
    rows = [3, 4, 2]
    floor, beta, features = 1e-4, 0.4, 10
    recon_t = torch.tensor(recon, dtype=torch.float32, requires_grad=True)
    mask = torch.tensor([[i < n for i in range(4)] for n in rows])
    loss = VAELoss(linear(10, 0.5), likelihood=Likelihood.gaussian, variance_floor=floor)
    terms = loss(recon_t, torch.tensor(x, dtype=torch.float32),
                 torch.tensor(mu, dtype=torch.float32), torch.tensor(logvar, dtype=torch.float32),
                 epoch=1, mask=mask)
    for g, n in enumerate(rows):
        error = (recon[g, :n] - x[g, :n]).reshape(n, -1) ** 2
        mse = error.mean()
        sigma2 = max(mse, floor)
        kl = (-0.5 * (1 + logvar[g, :n] - mu[g, :n] ** 2 - np.exp(logvar[g, :n]))).sum(-1).mean()
        nll = 0.5 * (error / sigma2 + np.log(2 * np.pi * sigma2)).sum(-1).mean()
        if mse >= floor:
            assert nll == pytest.approx(0.5 * features * (np.log(2 * np.pi * mse) + 1))
        assert terms.sigma2[g].item() == pytest.approx(sigma2, rel=1e-5)
        assert terms.mse[g].item() == pytest.approx(mse, rel=1e-5)
        assert terms.recon[g].item() == pytest.approx(nll, rel=1e-4)
        assert terms.total[g].item() == pytest.approx(nll + beta * kl, rel=1e-4)
        assert terms.effective_beta[g].item() == pytest.approx(beta * sigma2 / mse, rel=1e-4)
    assert terms.mse[2] < floor and terms.effective_beta[2] > beta
    torch.testing.assert_close(terms.effective_beta[:2], torch.tensor([beta, beta]))
    terms.total.sum().backward()
    assert recon_t.grad[0, 3].abs().sum() == 0 and recon_t.grad[2, 2:].abs().sum() == 0
    assert recon_t.grad[0, :3].abs().sum() > 0


def test_mse_likelihood_implies_a_decoder_variance_of_half_the_features() -> None:
    """``likelihood=mse`` is the Gaussian NLL of sigma^2 = D/2 up to a constant: its logged
    sigma^2 is D/2 and its effective beta ``beta D / (2 mse)``."""
    torch.manual_seed(0)
    x, recon = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    mu, logvar = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    terms = VAELoss(linear(10, 0.5), likelihood=Likelihood.mse)(
        recon, x, mu, logvar, 1, torch.ones(2, 3, dtype=torch.bool))
    torch.testing.assert_close(terms.sigma2, torch.tensor([4.0, 4.0]))
    torch.testing.assert_close(terms.effective_beta, 0.4 * 8 / (2 * terms.mse))


@pytest.mark.parametrize("likelihood", list(Likelihood))
def test_free_bits_floor_each_dimensions_batch_mean_kl(likelihood: Likelihood) -> None:
    """Free bits (Kingma et al. 2016): the KL term is ``sum_j max(free_bits, KL_j)`` with
    ``KL_j`` the mean over a generator's real rows; dimensions under the floor get no KL
    gradient; beta multiplies the floored term in every likelihood. With unit posterior
    variances ``KL_j = mean(mu_j^2) / 2``: dimension 0 holds 0.425 nats (its rows 0.005 and
    0.845: floored as a batch mean, not row by row), 1 holds 2, 2 holds 0; row 2 is padding."""
    mu = torch.tensor([[[0.1, 2.0, 0.0], [1.3, 2.0, 0.0], [9.0, 9.0, 9.0]]], requires_grad=True)
    logvar = torch.zeros(1, 3, 3)
    mask = torch.tensor([[True, True, False]])
    x = torch.ones(1, 3, 4)

    def terms(free_bits: float, reduction: KlReduction = KlReduction.sum) -> object:
        loss = VAELoss(linear(10, 0.5), kl_reduction=reduction, likelihood=likelihood,
                       free_bits=free_bits)
        return loss(x, x, mu, logvar, 0, mask, torch.zeros(1, 1, 1))

    assert terms(0.0).kl.item() == pytest.approx(0.425 + 2.0)
    floored = terms(0.5)
    assert floored.kl.item() == pytest.approx(0.5 + 2.0 + 0.5)
    assert terms(0.5, KlReduction.mean).kl.item() == pytest.approx(3.0 / 3)
    assert terms(3.0).kl.item() == pytest.approx(9.0)
    torch.testing.assert_close(floored.total - floored.recon, 0.2 * floored.kl)
    floored.total.sum().backward()
    assert mu.grad[0, :2, 0].abs().sum() == 0 and mu.grad[0, :2, 2].abs().sum() == 0
    torch.testing.assert_close(mu.grad[0, :2, 1], torch.tensor([0.2, 0.2]) * 2.0 / 2)


def test_free_bits_and_likelihood_are_configured(
        make_config: Callable[..., DictConfig]) -> None:
    """The new default is the Gaussian likelihood without free bits; ``free_bits < 0`` and a
    variance floor <= 0 are refused with one line naming the key."""
    config = validate(make_config()).generator
    assert (config.likelihood, config.free_bits, config.variance_floor) == (
        Likelihood.gaussian, 0.0, 1e-4)
    loss = vae_loss(validate(make_config("generator.likelihood=mse",
                                         "generator.free_bits=0.25")).generator,
                    rounds=1, round_=1)
    assert (loss.likelihood, loss.free_bits) == (Likelihood.mse, 0.25)
    assert (config.decoder_variance, config.variance_lr) == (DecoderVariance.optimal, 0.01)
    learned = validate(make_config("generator.decoder_variance=learned")).generator
    assert vae_loss(learned, rounds=1, round_=1).decoder_variance is DecoderVariance.learned
    for override, message in (
            ("generator.free_bits=-0.1", "generator.free_bits=-0.1: must be"),
            ("generator.variance_floor=0", "generator.variance_floor=0"),
            ("generator.variance_lr=0", "generator.variance_lr=0.0: must be > 0"),
            ("generator.likelihood=mse generator.decoder_variance=learned",
             "generator.decoder_variance=learned: learned applies to generator.likelihood="
             "gaussian only")):
        with pytest.raises(ConfigError) as err:
            validate(make_config(*override.split()))
        assert message in str(err.value) and "\n" not in str(err.value)


def test_stacked_adam_equals_torch_adam_per_generator() -> None:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(2, 3))
    single = [torch.nn.Parameter(weight[k].detach().clone()) for k in range(2)]
    masked = StackedAdam([weight], lr=0.01)
    reference = [torch.optim.Adam([p], lr=0.01) for p in single]
    for active in ([True, True], [True, False], [False, True], [True, True]):
        grads = torch.randn(2, 3)
        weight.grad = grads.clone()
        masked.step(torch.tensor(active))
        for k in range(2):
            if active[k]:
                single[k].grad = grads[k].clone()
                reference[k].step()
            torch.testing.assert_close(weight[k], single[k])


def test_stacked_adamw_with_per_model_rates_equals_torch_adamw_per_model() -> None:
    """The batched adapter executor's form: weight decay, a learning rate per model and step
    (a schedule) and gradients handed over, not read from ``.grad``; the state round-trips
    through torch's AdamW state dict of each model."""
    torch.manual_seed(0)
    weight, bias = torch.randn(3, 4, 2), torch.randn(3, 1, 2)
    single = [[torch.nn.Parameter(t[k].clone()) for t in (weight, bias)] for k in range(3)]
    stacked = StackedAdam([weight, bias], weight_decay=0.1)
    reference = [torch.optim.AdamW(p, lr=0.01, weight_decay=0.1) for p in single]
    for active in ([1, 1, 1], [1, 0, 1], [0, 1, 1]):
        grads = [torch.randn(3, 4, 2), torch.randn(3, 1, 2)]
        lr = torch.tensor([0.01, 0.02, 0.03])
        stacked.step(torch.tensor(active, dtype=torch.bool), grads, lr)
        for k in range(3):
            if active[k]:
                for p, g in zip(single[k], grads, strict=True):
                    p.grad = g[k].clone()
                reference[k].param_groups[0]["lr"] = float(lr[k])
                reference[k].step()
            torch.testing.assert_close(weight[k], single[k][0].detach())
            torch.testing.assert_close(bias[k], single[k][1].detach())
    state = stacked.export_torch(2, reference[2].state_dict()["param_groups"])
    for i, entry in reference[2].state_dict()["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state["state"][i][key], entry[key])
    again = StackedAdam([weight.clone(), bias.clone()], weight_decay=0.1)
    again.load_torch(1, reference[1].state_dict())
    torch.testing.assert_close(again.steps, torch.tensor([0.0, 2.0, 0.0]))
    torch.testing.assert_close(again.v[1][1], stacked.v[1][1])


def test_non_finite_flags_keep_each_models_first_bad_loss_and_step() -> None:
    flags = NonFiniteFlags(3, torch.device("cpu"))
    nan, inf = float("nan"), float("inf")
    on = torch.tensor([True, True, False])
    assert flags.update(torch.tensor([1.0, 2.0, nan]), on, 0).tolist() == [False] * 3
    assert flags.failed() == []
    assert flags.update(torch.tensor([1.0, inf, nan]), on, 1).tolist() == [False, True, False]
    assert flags.update(torch.tensor([nan, nan, 1.0]), on, 2).tolist() == [True, False, False]
    assert flags.failed() == [1, 0]  # the earliest step first
    assert math.isnan(flags.value[0]) and flags.value[1:].tolist() == [inf, 0.0]
    assert flags.step.tolist() == [2, 1, 0]


@pytest.mark.parametrize("flat", [False, True])
def test_per_generator_clipping_matches_clip_grad_norm(flat: bool) -> None:
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.zeros(3, 4, 2)), torch.nn.Parameter(torch.zeros(3, 1, 2))
    w.grad, b.grad = torch.randn(3, 4, 2) * 5, torch.randn(3, 1, 2) * 5
    expected = []
    for k in range(3):
        pw, pb = torch.nn.Parameter(w[k].detach()), torch.nn.Parameter(b[k].detach())
        pw.grad, pb.grad = w.grad[k].clone(), b.grad[k].clone()
        torch.nn.utils.clip_grad_norm_([pw, pb], 1.0)
        expected.append((pw.grad, pb.grad))
    clip_per_model([w.grad, b.grad], 1.0, flat=flat)
    for k in range(3):
        torch.testing.assert_close(w.grad[k], expected[k][0])
        torch.testing.assert_close(b.grad[k], expected[k][1])


def _data(counts: list[int], features: int = 12) -> GeneratorData:
    """Each generator's rows lie near a 2-d subspace (learnable with a small latent)."""
    torch.manual_seed(1)
    x = torch.zeros(len(counts), max(counts), features)
    for k, n in enumerate(counts):
        basis = torch.randn(2, features)
        x[k, :n] = torch.randn(n, 2) @ basis + 0.05 * torch.randn(n, features) + k
    return GeneratorData(x, torch.tensor(counts))


#: (likelihood, decoder variance) of every VAE loss.
VARIANTS = [(Likelihood.mse, DecoderVariance.optimal), (Likelihood.gaussian,
            DecoderVariance.optimal), (Likelihood.gaussian, DecoderVariance.learned)]
VARIANCE_LR = 0.05


def _lrs(model: VAEGenerator, lr: float = 0.01) -> list[float]:
    """``lr`` for the weights, :data:`VARIANCE_LR` for a learned decoder variance."""
    return [VARIANCE_LR if name == "dec_logvar" else lr for name, _ in model.named_parameters()]


def _train(model: VAEGenerator, data: GeneratorData, seeds: list[int], epochs: int = 6,
           variant: tuple[Likelihood, DecoderVariance] = VARIANTS[0]) -> list:
    optimizer = StackedAdam(list(model.parameters()), lr=_lrs(model))
    rngs = [torch.Generator().manual_seed(s) for s in seeds]
    loss = VAELoss(linear(epochs, 0.5), likelihood=variant[0], decoder_variance=variant[1])
    return train_generators(model, optimizer, loss, data, epochs, batch_size=4, grad_clip=1.0,
                            rngs=rngs)


@pytest.mark.parametrize("variant", VARIANTS)
def test_batched_training_equals_one_by_one(variant: tuple[Likelihood, DecoderVariance]
                                            ) -> None:
    """K generators with unequal data, trained together, match each trained alone (with a
    learned decoder variance, the variances too)."""
    counts = [9, 4, 13]
    data = _data(counts)
    learned = variant[1] is DecoderVariance.learned
    torch.manual_seed(2)
    batched = VAEGenerator(3, 12, 16, 3, learned_variance=learned)
    initial = {k: v.clone() for k, v in batched.state_dict().items()}
    logs = _train(batched, data, seeds=[10, 11, 12], variant=variant)
    assert ("dec_logvar" in initial) == learned
    if learned:
        assert (batched.dec_logvar.abs() > 0.02).all()
    for k, n in enumerate(counts):
        alone = VAEGenerator(1, 12, 16, 3, learned_variance=learned)
        alone.load_state_dict({name: v[k : k + 1].clone() for name, v in initial.items()})
        alone_logs = _train(alone, GeneratorData(data.x[k : k + 1, :n], torch.tensor([n])),
                            seeds=[10 + k], variant=variant)
        for name, value in alone.state_dict().items():
            torch.testing.assert_close(batched.state_dict()[name][k : k + 1], value,
                                       rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(logs[-1].total[k], alone_logs[-1].total[0],
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logs[-1].mse[k], alone_logs[-1].mse[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logs[-1].log_sigma2[k], alone_logs[-1].log_sigma2[0],
                                   rtol=1e-5, atol=1e-6)


def test_training_reduces_the_loss_and_samples_have_the_data_shape() -> None:
    data = _data([32, 32])
    torch.manual_seed(3)
    model = VAEGenerator(2, 12, 32, 4)
    logs = _train(model, data, seeds=[0, 1], epochs=30)
    assert (logs[-1].total < 0.8 * logs[0].total).all()
    assert (logs[-1].recon < logs[0].recon).all()
    assert [log.beta for log in logs[:3]] == pytest.approx([1 / 15, 2 / 15, 3 / 15])
    samples = model.sample(5, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (2, 5, 12)
    assert samples[1].mean() > samples[0].mean() + 0.5


def test_augmentation_noise_perturbs_the_inputs_reproducibly() -> None:
    data = _data([16, 16])

    def final_loss(noise: float, seed: int = 5) -> torch.Tensor:
        torch.manual_seed(3)
        model = VAEGenerator(2, 12, 16, 3)
        optimizer = StackedAdam(list(model.parameters()), lr=0.01)
        rngs = [torch.Generator().manual_seed(seed + k) for k in range(2)]
        logs = train_generators(model, optimizer, VAELoss(linear(3, 0.5)), data, 3, 4, 1.0, rngs,
                                noise_std=noise)
        return logs[-1].total

    torch.testing.assert_close(final_loss(0.5), final_loss(0.5))
    assert not torch.allclose(final_loss(0.5), final_loss(0.0))
    assert (final_loss(2.0) > final_loss(0.0)).all()


def _low_rank_classes(features: int, rows: int, directions: int,
                      scales: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of class ``c``: a class mean + ``scales[c]`` x Gaussian noise along ``directions``
    random directions + small isotropic noise; class ids ``[rows * len(scales)]``."""
    g = torch.Generator().manual_seed(0)
    xs, ys = [], []
    for c, scale in enumerate(scales):
        mean = torch.randn(features, generator=g)
        basis = torch.randn(directions, features, generator=g)
        noise = 0.05 * scale * torch.randn(rows, features, generator=g)
        xs.append(mean + scale * torch.randn(rows, directions, generator=g) @ basis + noise)
        ys.append(torch.full((rows,), c))
    return torch.cat(xs), torch.cat(ys)


def _fit(config: GeneratorConfig, x: torch.Tensor, y: torch.Tensor) -> GeneratorBank:
    names = [f"class{c}" for c in range(int(y.max()) + 1)]
    torch.manual_seed(0)
    bank = GeneratorBank(GeneratorSpec(names, [[c] for c in range(len(names))]), x.shape[1],
                         config, 0, torch.device("cpu"))
    rngs = [torch.Generator().manual_seed(k) for k in range(len(names))]
    bank.fit(x, y, None, vae_loss(config, rounds=1, round_=1), rngs, where="node 3, round 1: ")
    return bank


def test_gaussian_likelihood_keeps_latent_dimensions_active_where_mse_collapses() -> None:
    """Rows = class mean + noise along 3 directions (variance 0.27 per feature over 1024
    features). Under ``mse`` the reconstruction is averaged over the features, so encoding a
    direction buys at most ~0.09 of loss against a KL of nats: collapse (0 active units) is the
    optimum. The summed Gaussian NLL weighs the same direction at ~1024 x 0.09 / (2 sigma^2)
    nats, so the posterior keeps dimensions whose posterior means vary over the data (> 0.01,
    Burda et al. 2016)."""
    x, y = _low_rank_classes(1024, 64, 3, (0.3, 0.3))
    active = {}
    for likelihood in Likelihood:
        config = GeneratorConfig(**UNIT, likelihood=likelihood, training_epochs=30, hidden_dim=64,
                                 latent_dim=8, lr=0.003)
        bank = _fit(config, x, y)
        data = bank.data(x, y, None)
        with torch.no_grad():
            mu, _ = bank.model.encode(data.x)
        active[likelihood] = (mu.var(1) > 0.01).sum(-1)
    assert (active[Likelihood.gaussian] > 1).all(), active
    assert (active[Likelihood.mse] == 0).all(), active


@pytest.mark.parametrize("variance", list(DecoderVariance))
def test_a_generator_at_the_variance_floor_is_named(caplog: pytest.LogCaptureFixture,
                                                    variance: DecoderVariance) -> None:
    """Identical rows let the decoder reconstruct exactly, so its decoder variance (the optimal
    one: its MSE; or the learned one) falls to the floor (0.5 here, reached in few steps); the
    warning names the node and that generator only (the other class varies by far more than
    the floor)."""
    x, y = _low_rank_classes(64, 32, 2, (0.0, 2.0))
    config = GeneratorConfig(**UNIT, training_epochs=20, hidden_dim=16, latent_dim=4, lr=0.05,
                             variance_floor=0.5, decoder_variance=variance, variance_lr=0.05)
    with caplog.at_level(logging.WARNING, logger="flcore.trainmodel.generators"):
        bank = _fit(config, x, y)
    if variance is DecoderVariance.learned:
        assert bank.model.dec_logvar[0].item() <= math.log(0.5) < bank.model.dec_logvar[1].item()
    floors = [r.getMessage() for r in caplog.records if "variance_floor" in r.getMessage()]
    assert floors == [floors[0]] and floors[0].startswith("node 3, round 1: generator class0:")


def test_the_learned_variance_travels_with_the_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """``dec_logvar`` starts at the log of each class's row variance (per feature, population,
    averaged), is trained towards its optimum, the log of the reconstructions' MSE, is sliced
    with its generator and sent in the decoder package; a bank built from the package samples
    what the sender would."""
    from flcore.trainmodel import bank_training

    starts: list[torch.Tensor] = []
    original = bank_training.start_learned_variance

    def spy(dec_logvar: torch.Tensor, *args: object) -> None:
        original(dec_logvar, *args)
        starts.append(dec_logvar.detach().flatten().clone())

    monkeypatch.setattr(bank_training, "start_learned_variance", spy)
    x, y = _low_rank_classes(32, 16, 2, (1.0, 1.0))
    config = GeneratorConfig(**UNIT, training_epochs=20, hidden_dim=16, latent_dim=4, lr=0.05,
                             decoder_variance=DecoderVariance.learned, variance_lr=0.1)
    bank = _fit(config, x, y)
    rows = torch.stack([x[y == c] for c in (0, 1)])  # [K=2, 16, 32]
    start = torch.stack([torch.var(r, dim=0, unbiased=False).mean() for r in rows]).log()
    assert len(starts) == 1
    torch.testing.assert_close(starts[0], start)
    # The reconstruction MSE the NLL's variance is optimal for: over every row of each class
    # and 64 posterior draws.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        mse = torch.stack([((bank.model(rows, torch.randn(2, 16, 4, generator=g))[0] - rows) ** 2)
                           .mean((1, 2)) for _ in range(64)]).mean(0)
    end = bank.model.dec_logvar.detach().flatten()
    assert ((end - mse.log()).abs() < (start - mse.log()).abs()).all(), (start, end, mse.log())
    one = slice_generator(bank.model, 1)
    assert one.dec_logvar.data_ptr() == bank.model.dec_logvar[1:2].data_ptr()
    package = bank.decoder_package()
    received = GeneratorBank.from_decoder(package, config, torch.device("cpu"))
    torch.testing.assert_close(received.model.dec_logvar, bank.model.dec_logvar)
    counts = {0: 3, 1: 2}
    sent = bank.sample(counts, None, {}, torch.Generator().manual_seed(7))
    got = received.sample(counts, None, {}, torch.Generator().manual_seed(7))
    torch.testing.assert_close(sent[0], got[0])
    torch.testing.assert_close(sent[1], got[1])


# --- sample_noise: draws of the decoder's Gaussian --------------------------------------------


def _fit_bank(config: GeneratorConfig, spec: GeneratorSpec, x: torch.Tensor, y: torch.Tensor,
              prompts: torch.Tensor | None = None, cond: int = 0) -> tuple[GeneratorBank, list]:
    """A bank of ``spec`` (seeded) after one training on ``x``, ``y``, and its epoch logs."""
    torch.manual_seed(0)
    bank = GeneratorBank(spec, x.shape[1], config, cond, torch.device("cpu"))
    return bank, _refit(bank, x, y, prompts)


def _refit(bank: GeneratorBank, x: torch.Tensor, y: torch.Tensor,
           prompts: torch.Tensor | None = None) -> list:
    rngs = [torch.Generator().manual_seed(20 + g) for g in range(bank.model.k)]
    loss = vae_loss(bank.config, rounds=1, round_=1)
    return bank.fit(x, y, prompts, loss, rngs, where="node 0, round 1: ")


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_training_keeps_its_generators_decoder_variance(
        variant: tuple[Likelihood, DecoderVariance]) -> None:
    """``dec_sigma2`` after a training is each generator's decoder variance: under the optimal
    sigma ``exp(log_sigma2)`` of the last epoch, under a learned one ``exp(dec_logvar)``
    (floored as the loss floors it), under ``likelihood=mse`` the last epoch's MSE. A generator
    without rows in a later training keeps its own."""
    likelihood, variance = variant
    config = _bank_config(likelihood=likelihood, decoder_variance=variance, variance_lr=0.05)
    x, y = _node([0, 1], [9, 12], 5)
    bank, logs = _fit_bank(config, GeneratorSpec(["c0", "c1"], [[0], [1]]), x, y)

    def expected(last: object) -> torch.Tensor:
        if variance is DecoderVariance.learned:
            floor = math.log(config.variance_floor)
            return bank.model.dec_logvar.detach().clamp(min=floor).exp().flatten()
        if likelihood is Likelihood.gaussian:
            return last.log_sigma2.exp()
        return last.mse

    kept = bank.model.dec_sigma2.flatten().clone()
    torch.testing.assert_close(kept, expected(logs[-1]))
    assert (kept > 0).all()
    only = y == 0
    logs = _refit(bank, x[only], y[only])
    now = bank.model.dec_sigma2.flatten()
    assert now[1] == kept[1] and now[0] != kept[0]
    torch.testing.assert_close(now[0], expected(logs[-1])[0])


def test_sample_noise_adds_the_decoder_variance_to_each_feature() -> None:
    """One generator. With ``sample_noise`` a draw is the decoder mean of the latent a draw
    without noise takes from the same stream, plus ``sqrt(sigma^2) eps`` with ``eps`` drawn
    right after the latents; so over many draws each feature's variance is Var(decoder mean
    over z) + sigma^2, and without noise Var(decoder mean) (here from independent latents)."""
    config = _bank_config(training_epochs=14, likelihood=Likelihood.gaussian)
    x, y = _node([0], [24], 6)
    bank, _ = _fit_bank(config, GeneratorSpec(["c0"], [[0]]), x, y)
    sigma2 = bank.model.dec_sigma2.flatten()
    n, latent = 40_000, config.latent_dim
    plain = bank.sample({0: n}, None, {}, torch.Generator().manual_seed(1))[0]
    bank.config = dataclasses.replace(config, sample_noise=True)
    noisy = bank.sample({0: n}, None, {}, torch.Generator().manual_seed(1))[0]
    stream = torch.Generator().manual_seed(1)
    torch.randn(1, n, latent, generator=stream)
    eps = torch.randn(1, n, x.shape[1], generator=stream)[0]
    torch.testing.assert_close(noisy, plain + sigma2.sqrt() * eps)
    with torch.no_grad():
        z = torch.randn(1, n, latent, generator=torch.Generator().manual_seed(2))
        means = bank.model.decode(z)[0]
    between = means.var(0)
    assert float(sigma2) > 0.2 * float(between.mean())  # the noise is no rounding error
    torch.testing.assert_close(plain.var(0), between, rtol=0.05, atol=0)
    torch.testing.assert_close(noisy.var(0), between + sigma2, rtol=0.05, atol=0)


@pytest.mark.parametrize("variance", list(DecoderVariance))
def test_noisy_draws_travel_with_the_decoder_and_the_checkpoint(variance: DecoderVariance
                                                                ) -> None:
    """A conditional bank's decoder variance is in its ``share=decoder`` package and its state:
    the received bank and a restored one draw exactly what the sender draws with the same
    seed, noise included."""
    config = _bank_config(sample_noise=True, decoder_variance=variance,
                          likelihood=Likelihood.gaussian)
    x, y = _node([0, 1], [9, 12], 5)
    prompts = torch.randn(2, 8, generator=torch.Generator().manual_seed(3))
    spec = GeneratorSpec(["all"], [[0, 1]])
    bank, _ = _fit_bank(config, spec, x, y, prompts, cond=8)
    package = bank.decoder_package()
    assert torch.equal(package["decoder"]["dec_sigma2"], bank.model.dec_sigma2)
    received = GeneratorBank.from_decoder(package, config, torch.device("cpu"))
    restored = GeneratorBank(spec, 12, config, 8, torch.device("cpu"))
    restored.load_state_dict(bank.state_dict())
    counts = {0: 5, 1: 4}
    sent = bank.sample(counts, prompts, {}, torch.Generator().manual_seed(7))
    for other in (received, restored):
        got = other.sample(counts, prompts, {}, torch.Generator().manual_seed(7))
        assert torch.equal(got[0], sent[0]) and torch.equal(got[1], sent[1])
    bank.config = dataclasses.replace(config, sample_noise=False)
    means = bank.sample(counts, prompts, {}, torch.Generator().manual_seed(7))[0]
    assert not torch.allclose(means, sent[0])


# --- no host round trip, several banks as one, bf16 -------------------------------------------


def _reference_alone(init: dict, x: torch.Tensor, epochs: int, batch: int, seed: int,
                     loss: VAELoss, noise_std: float = 0.0, epoch_offset: int = 0,
                     lr: float = 0.01, grad_clip: float = 1.0
                     ) -> tuple[VAEGenerator, list[float]]:
    """One generator trained alone the plain way: its own rows ``x [n, F]``, a shuffle and noise
    from ``torch.Generator(seed)`` (a permutation an epoch; per minibatch the latent noise, then
    the input jitter), torch's Adam (:data:`VARIANCE_LR` for a learned variance, which starts
    at the rows' variance) and ``clip_grad_norm_``. Returns the model and each epoch's mean
    total loss."""
    n, features = x.shape
    learned = "dec_logvar" in init
    model = VAEGenerator(1, features, init["enc.weight"].shape[-1], init["dec.weight"].shape[1],
                         learned_variance=learned)
    model.load_state_dict(init)
    if learned:
        with torch.no_grad():
            model.dec_logvar.fill_(math.log(max(float(x.var(0, unbiased=False).mean()),
                                                loss.variance_floor)))
    optimizer = torch.optim.Adam([{"params": [p], "lr": group_lr} for p, group_lr in zip(
        model.parameters(), _lrs(model, lr), strict=True)])
    rng = torch.Generator().manual_seed(seed)
    means = []
    for epoch in range(epoch_offset, epoch_offset + epochs):
        order = torch.randperm(n, generator=rng)
        total = 0.0
        for start in range(0, n, batch):
            rows = x[order[start : start + batch]][None]
            noise = torch.randn(rows.shape[1], model.latent, generator=rng)[None]
            if noise_std > 0:
                rows = rows + noise_std * torch.randn(rows.shape[1], features, generator=rng)
            recon, mu, logvar = model(rows, noise)
            terms = loss(recon, rows, mu, logvar, epoch,
                         torch.ones(1, rows.shape[1], dtype=torch.bool), model.dec_logvar)
            optimizer.zero_grad()
            terms.total.sum().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            total += terms.total.item() * rows.shape[1]
        means.append(total / n)
    return model, means


@pytest.mark.parametrize("variant", VARIANTS)
def test_stacked_training_equals_plain_adam_one_generator_at_a_time(
        variant: tuple[Likelihood, DecoderVariance]) -> None:
    """The device-side step loop (masks, step counts and the NaN flag on the device; the
    branch-free StackedAdam) gives, for generators of unequal sizes (so that some sit out the
    last minibatches, and their Adam step counts drift apart) and with input jitter, what a
    plain torch.optim.Adam loop over one generator at a time gives: weights, Adam moments'
    effect and every epoch's mean loss."""
    counts = [9, 4, 13, 1]
    data = _data(counts)
    torch.manual_seed(2)
    model = VAEGenerator(4, 12, 16, 3, learned_variance=variant[1] is DecoderVariance.learned)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    loss = VAELoss(linear(5, 0.5), likelihood=variant[0], decoder_variance=variant[1])
    optimizer = StackedAdam(list(model.parameters()), lr=_lrs(model))
    rngs = [torch.Generator().manual_seed(20 + k) for k in range(4)]
    logs = train_generators(model, optimizer, loss, data, 5, 4, 1.0, rngs, noise_std=0.1)
    assert [log.steps for log in logs] == [4] * 5
    torch.testing.assert_close(optimizer.steps, torch.tensor([15.0, 5.0, 20.0, 5.0]))
    for k, n in enumerate(counts):
        alone, means = _reference_alone({name: v[k : k + 1] for name, v in initial.items()},
                                        data.x[k, :n], 5, 4, 20 + k, loss, noise_std=0.1)
        # A learned variance of one row starts at the floor (its rows' variance is 0), where
        # the NLL weighs errors by 1 / 1e-4, which magnifies float rounding tenfold.
        stiff = n == 1 and variant[1] is DecoderVariance.learned
        for name, value in alone.state_dict().items():
            torch.testing.assert_close(model.state_dict()[name][k : k + 1], value,
                                       rtol=1e-3 if stiff else 1e-4, atol=1e-4 if stiff else 1e-5)
        torch.testing.assert_close(torch.stack([log.total[k] for log in logs]),
                                   torch.tensor(means), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_stacked_adam_leaves_inactive_generators_untouched(fused: bool) -> None:
    """Both forms of the step (per-generator fused kernels, elementwise ``where``) equal torch's
    Adam per generator, keep their own step counts, and leave an inactive generator's weights
    and moments bit for bit as they were, even when its gradient is not finite."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(3, 2, 4))
    single = [torch.nn.Parameter(weight[k].detach().clone()) for k in range(3)]
    masked = StackedAdam([weight], lr=0.01)
    masked.fused = fused
    reference = [torch.optim.Adam([p], lr=0.01) for p in single]
    for active in ([1, 1, 1], [1, 0, 1], [0, 1, 0], [1, 1, 1], [1, 1, 0]):
        grads = torch.randn(3, 2, 4)
        weight.grad = grads.clone()
        for k in range(3):
            if not active[k]:
                weight.grad[k, 0, 0] = float("nan")
        before = (weight.detach().clone(), masked.m[0].clone(), masked.v[0].clone())
        masked.step(torch.tensor(active, dtype=torch.bool))
        for k in range(3):
            if active[k]:
                single[k].grad = grads[k].clone()
                reference[k].step()
            else:
                assert torch.equal(weight[k], before[0][k])
                assert torch.equal(masked.m[0][k], before[1][k])
                assert torch.equal(masked.v[0][k], before[2][k])
            torch.testing.assert_close(weight[k], single[k])
    torch.testing.assert_close(masked.steps, torch.tensor([4.0, 4.0, 3.0]))


def _bank_config(**overrides: object) -> GeneratorConfig:
    settings = {**UNIT, "training_epochs": 4, "hidden_dim": 16, "latent_dim": 3,
                "batch_size": 4, "lr": 0.01, **overrides}
    return GeneratorConfig(**settings)


def _node(classes: list[int], rows: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[sum(rows), 12]`` of ``classes`` (``rows[i]`` of class ``classes[i]``), shuffled."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, 2, generator=g) @ torch.randn(2, 12, generator=g) + c
          for c, n in zip(classes, rows, strict=True)]
    y = torch.cat([torch.full((n,), c) for c, n in zip(classes, rows, strict=True)])
    order = torch.randperm(len(y), generator=g)
    return torch.cat(xs)[order], y[order]


def _banks(config: GeneratorConfig) -> tuple[list[GeneratorBank], list, list]:
    """Three nodes' banks (per-class, 2, 3 and 1 generators; a unified one of two classes), of
    unequal sizes."""
    specs = [GeneratorSpec(["c0", "c1"], [[0], [1]]),
             GeneratorSpec(["c2", "c3", "c4"], [[2], [3], [4]]),
             GeneratorSpec(["all"], [[0, 5]])]
    nodes = [_node([0, 1], [9, 5], 1), _node([2, 3, 4], [3, 14, 7], 2), _node([0, 5], [6, 4], 3)]
    banks = []
    for i, spec in enumerate(specs):
        torch.manual_seed(10 + i)
        banks.append(GeneratorBank(spec, 12, config, 0, torch.device("cpu")))
    return banks, [x for x, _ in nodes], [y for _, y in nodes]


def _rngs(banks: list[GeneratorBank]) -> list[list[torch.Generator]]:
    return [[torch.Generator().manual_seed(100 * i + g) for g in range(bank.model.k)]
            for i, bank in enumerate(banks)]


@pytest.mark.parametrize("granularity", ["unified", "per_class"])
def test_the_optimal_sigma_keeps_beta_calibrated_at_every_epoch_of_every_round(
        granularity: str) -> None:
    """The drift it prevents: a learned σ that started at 1 and moved by about ``lr`` a step
    made the effective beta ~100 x beta, drifting within a run and differing between granularities
    (a unified generator takes more steps a round). With the optimal sigma, over three trainings
    of a node's rows, each generator's logged ``exp(log_sigma2)`` is its epoch's MSE and its
    effective beta the epoch's beta, at every epoch, for a unified and a per-class bank."""
    x, y = _node([0, 1, 2], [9, 5, 12], 4)
    spec = (GeneratorSpec(["all"], [[0, 1, 2]]) if granularity == "unified" else
            GeneratorSpec(["c0", "c1", "c2"], [[0], [1], [2]]))
    config = _bank_config(beta_warmup_ratio=0.5, likelihood=Likelihood.gaussian)
    torch.manual_seed(0)
    bank = GeneratorBank(spec, 12, config, 0, torch.device("cpu"))
    loss = vae_loss(config, rounds=1, round_=1)
    betas, checked = [loss.beta(e) for e in range(config.training_epochs)], 0
    for round_ in range(3):
        rngs = [torch.Generator().manual_seed(10 * round_ + g) for g in range(bank.model.k)]
        for log in bank.fit(x, y, None, loss, rngs, f"round {round_}: "):
            assert log.beta == betas[log.epoch]
            assert (log.mse > config.variance_floor).all()
            torch.testing.assert_close(log.log_sigma2.exp(), log.mse, rtol=1e-5, atol=0)
            torch.testing.assert_close(log.effective_beta, torch.full_like(log.mse, log.beta),
                                       rtol=1e-5, atol=0)
            checked += 1
    assert checked == 3 * config.training_epochs


def test_a_learned_variance_starts_at_each_generators_data_variance() -> None:
    """``decoder_variance=learned`` starts each generator's log sigma^2 at the log of its own
    rows' variance (per-feature, population, averaged over features; padding left out), before
    its first step, and trains it at ``generator.variance_lr``; a second training does not
    reset it."""
    x, y = _node([0, 1], [9, 5], 5)
    config = _bank_config(likelihood=Likelihood.gaussian, decoder_variance=DecoderVariance.learned,
                          variance_lr=0.02, training_epochs=1)
    torch.manual_seed(0)
    bank = GeneratorBank(GeneratorSpec(["c0", "c1"], [[0], [1]]), 12, config, 0,
                         torch.device("cpu"))
    assert bank.optimizer.lrs == [0.02] + [0.01] * 8  # dec_logvar, then the layers
    data = bank.data(x, y, None)
    start = [math.log(float(x[y == c].var(0, unbiased=False).mean())) for c in (0, 1)]
    start_learned_variance(bank.model.dec_logvar, bank.optimizer.steps, data, 1e-4)
    torch.testing.assert_close(bank.model.dec_logvar.flatten(), torch.tensor(start))
    rngs = [torch.Generator().manual_seed(g) for g in range(2)]
    logs = bank.fit(x, y, None, vae_loss(config, rounds=1, round_=1), rngs, "")
    steps = torch.tensor([3.0, 2.0])  # 9 and 5 rows in minibatches of 4
    torch.testing.assert_close(bank.optimizer.steps, steps)
    moved = bank.model.dec_logvar.flatten() - torch.tensor(start)
    assert (moved.abs() <= 0.02 * steps + 1e-6).all() and (moved.abs() > 0.005).all()
    torch.testing.assert_close(logs[0].log_sigma2, bank.model.dec_logvar.flatten(), atol=0.05,
                               rtol=0)
    trained = bank.model.dec_logvar.detach().clone()
    bank.fit(x, y, None, vae_loss(config, rounds=1, round_=1), rngs, "")
    assert ((bank.model.dec_logvar - trained).abs() <= 0.02 * steps.view(-1, 1, 1) + 1e-6).all()


def test_a_node_sampled_late_ends_the_whole_run_warmup_on_time() -> None:
    """``schedule_scope=whole_run``: the schedule's offset is the round, not the node's count of
    trainings. A node trained only in rounds 7..10 of 10 (warm-up ratio 1: the whole run)
    starts round 7 at schedule epoch 6 x epochs and reaches beta_max at its last epoch of
    round 10 (counting its own trainings, it ended at beta 0.4)."""
    config = _bank_config(schedule_scope=ScheduleScope.whole_run, beta_warmup_ratio=1.0,
                          beta_max=2.0, training_epochs=3)
    x, y = _node([0, 1], [6, 5], 7)
    torch.manual_seed(0)
    bank = GeneratorBank(GeneratorSpec(["c0", "c1"], [[0], [1]]), 12, config, 0,
                         torch.device("cpu"))
    logs = []
    for round_ in range(7, 11):
        rngs = [torch.Generator().manual_seed(round_ * 10 + g) for g in range(2)]
        loss = vae_loss(config, rounds=10, round_=round_)
        logs += bank.fit(x, y, None, loss, rngs, f"round {round_}: ")
    assert [log.epoch for log in logs] == list(range(18, 30))
    assert [log.beta for log in logs] == pytest.approx([2.0 * (e + 1) / 30 for e in range(18, 30)])
    assert logs[-1].beta == 2.0


@pytest.mark.parametrize(("scope", "train_every", "round_", "start", "total"), [
    (ScheduleScope.per_round, 1, 5, 0, 3), (ScheduleScope.whole_run, 1, 1, 0, 36),
    (ScheduleScope.whole_run, 1, 5, 12, 36), (ScheduleScope.whole_run, 2, 2, 0, 18),
    (ScheduleScope.whole_run, 2, 6, 6, 18), (ScheduleScope.whole_run, 3, 9, 6, 12),
    (ScheduleScope.whole_run, 5, 10, 3, 6)])
def test_the_beta_schedule_spans_the_generator_rounds_of_its_scope(
        scope: ScheduleScope, train_every: int, round_: int, start: int, total: int) -> None:
    """Of a 12-round run: generator rounds are every ``train_every``-th (3 epochs each);
    ``per_round`` spans one training from epoch 0, ``whole_run`` every generator round of the
    run, round r starting after the ``(r - 1) // train_every`` generator rounds before it."""
    config = _bank_config(schedule_scope=scope, train_every=train_every, training_epochs=3)
    schedule = beta_schedule(config, rounds=12, round_=round_)
    assert (schedule.first_epoch, schedule.total_epochs) == (start, total)
    assert vae_loss(config, rounds=12, round_=round_).beta == schedule


@pytest.mark.parametrize(("scope", "max_generators", "noise"), [
    (ScheduleScope.per_round, None, 0.0), (ScheduleScope.whole_run, None, 0.1),
    (ScheduleScope.whole_run, 2, 0.0), (ScheduleScope.per_round, 4, 0.1)])
def test_banks_of_several_nodes_train_as_one_as_each_alone(
        scope: ScheduleScope, max_generators: int | None, noise: float) -> None:
    """Three nodes' banks (2, 3 and 1 generators, unequal rows; under whole_run at the second
    of three rounds), trained as one stack (or in chunks of at most ``max_generators``,
    splitting banks), end where each trained alone ends: weights, Adam moments and step
    counts, and every epoch log (epoch, beta, steps, loss terms)."""
    config = _bank_config(schedule_scope=scope, augmentation_noise=noise)
    together, xs, ys = _banks(config)
    alone = copy.deepcopy(together)
    rounds = 3 if scope is ScheduleScope.whole_run else 1
    loss = vae_loss(config, rounds=rounds, round_=2)
    wheres = [f"node {i}, round 2: " for i in range(3)]
    logs = fit_together(together, xs, ys, [None] * 3, loss, _rngs(together), wheres,
                        max_generators=max_generators)
    rngs = _rngs(alone)
    expected = [bank.fit(x, y, None, loss, r, w)
                for bank, x, y, r, w in zip(alone, xs, ys, rngs, wheres, strict=True)]
    for a, b, got, want in zip(together, alone, logs, expected, strict=True):
        assert (a.trainings, a.dropped) == (b.trainings, b.dropped)
        for name, value in b.model.state_dict().items():
            torch.testing.assert_close(a.model.state_dict()[name], value, rtol=1e-4, atol=1e-5)
        for mine, theirs in zip(a.optimizer.m + a.optimizer.v, b.optimizer.m + b.optimizer.v,
                                strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)
        assert torch.equal(a.optimizer.steps, b.optimizer.steps)
        assert [(g.epoch, g.beta, g.steps) for g in got] == [
            (w.epoch, w.beta, w.steps) for w in want]
        for g, w in zip(got, want, strict=True):
            for term in ("total", "recon", "kl", "similarity", "mse", "log_sigma2",
                         "effective_beta"):
                torch.testing.assert_close(getattr(g, term), getattr(w, term),
                                           rtol=1e-5, atol=1e-5)
    assert logs[1][0].epoch == (4 if scope is ScheduleScope.whole_run else 0)


def test_banks_trained_together_name_the_node_generator_and_epoch_of_a_nan() -> None:
    """A non-finite loss in the second node's ``c3`` stops the joint training with that node's
    ``where``, the generator and the epoch; with ``on_nan=drop_generator`` only that generator
    is dropped, and the others end as they would alone."""
    config = _bank_config()
    banks, xs, ys = _banks(config)
    xs[1] = torch.where((ys[1] == 3)[:, None], torch.tensor(float("inf")), xs[1])
    loss = vae_loss(config, rounds=1, round_=1)
    wheres = [f"node {i}, round 2: " for i in range(3)]
    with pytest.raises(TrainingError, match=r"^node 1, round 2: generator c3, epoch 1: VAE loss "
                                            r"is (nan|inf); lower generator\.lr"):
        fit_together(banks, xs, ys, [None] * 3, loss, _rngs(banks), wheres)
    config = _bank_config(on_nan=OnNan.drop_generator)
    banks, _, _ = _banks(config)
    alone = copy.deepcopy(banks)
    fit_together(banks, xs, ys, [None] * 3, loss, _rngs(banks), wheres)
    assert [bank.dropped for bank in banks] == [[], ["c3"], []]
    for a, b, x, y, r, w in zip(banks, alone, xs, ys, _rngs(alone), wheres, strict=True):
        b.fit(x, y, None, loss, r, w)
        assert a.dropped == b.dropped
        for (name, mine), theirs in zip(a.model.state_dict().items(),
                                        b.model.state_dict().values(), strict=True):
            keep = [g for g, n in enumerate(a.spec.names) if n not in a.dropped]
            torch.testing.assert_close(mine[keep], theirs[keep], rtol=1e-4, atol=1e-5,
                                       msg=name)


def test_banks_of_other_shapes_or_settings_are_refused_or_stacked_apart() -> None:
    config = _bank_config()
    banks, xs, ys = _banks(config)
    loss = vae_loss(config, rounds=1, round_=1)
    wide = GeneratorBank(GeneratorSpec(["all"], [[0, 1]]), 12, config, 5, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"^node 9: generator banks trained together must "
                                         r"share \(features, .* differs from node 0 in cond 5 "
                                         r"\(vs 0\)$"):
        train_banks([banks[0], wide], xs[:1] * 2, ys[:1] * 2, [None, torch.randn(6, 5)],
                    loss, _rngs([banks[0], wide]), ["node 0: ", "node 9: "])
    faster = GeneratorBank(GeneratorSpec(["c0"], [[0]]), 12, _bank_config(lr=0.1), 0,
                           torch.device("cpu"))
    with pytest.raises(ValueError, match=r"differs from node 0 in lr 0\.1 \(vs 0\.01\)$"):
        train_banks([banks[0], faster], xs[:1] * 2, ys[:1] * 2, [None] * 2, loss,
                    _rngs([banks[0], faster]), ["node 0: ", "node 1: "])
    # fit_together stacks banks of each shape apart, each as it would train alone
    prompts = torch.randn(6, 5)
    alone = copy.deepcopy(wide)
    logs = fit_together([banks[0], wide], xs[:1] * 2, ys[:1] * 2, [None, prompts],
                        loss, _rngs([banks[0], wide]), ["node 0: ", "node 9: "])
    expected = alone.fit(xs[0], ys[0], prompts, loss, _rngs([banks[0], wide])[1], "node 9: ")
    torch.testing.assert_close(logs[1][-1].total, expected[-1].total)
    torch.testing.assert_close(wide.model.dec.weight, alone.model.dec.weight)


def test_bf16_forward_trains_close_to_fp32_and_keeps_fp32_weights() -> None:
    """``generator.precision=bf16`` runs the forward pass under bf16 autocast (CPU here): the
    weights and Adam moments stay fp32, and every epoch's mean loss is within 5% of the fp32
    run's from the same weights, rows and noise (the reference: the fp32 run in this test,
    itself checked against plain Adam above)."""
    logs = {}
    for precision in Precision:
        config = _bank_config(precision=precision, likelihood=Likelihood.mse)
        banks, xs, ys = _banks(config)
        logs[precision] = banks[1].fit(xs[1], ys[1], None, vae_loss(config, rounds=1, round_=1),
                                       _rngs(banks)[1], "node 1: ")
        assert banks[1].model.enc.weight.dtype == torch.float32
        assert banks[1].optimizer.m[0].dtype == torch.float32
        assert all(torch.isfinite(log.total).all() for log in logs[precision])
    for low, full in zip(logs[Precision.bf16], logs[Precision.fp32], strict=True):
        torch.testing.assert_close(low.total, full.total, rtol=0.05, atol=0.0)
    assert not torch.equal(logs[Precision.bf16][-1].total, logs[Precision.fp32][-1].total)


def test_generator_precision_is_configured(make_config: Callable[..., DictConfig]) -> None:
    """``generator.precision`` defaults to fp32; bf16 is accepted for VAEs and refused, in one
    line naming the key, for the closed-form Gaussian model."""
    assert validate(make_config()).generator.precision is Precision.fp32
    assert validate(make_config("generator.precision=bf16")).generator.precision is (
        Precision.bf16)
    with pytest.raises(ConfigError) as err:
        validate(make_config("generator.model=gaussian", "generator.precision=bf16"))
    assert "generator.precision=bf16" in str(err.value) and "\n" not in str(err.value)
