"""Beta schedules (the fix's specification), the VAE loss, and batched generator training."""

import itertools
import logging
import math
from collections.abc import Callable

import pytest
import torch
from omegaconf import DictConfig
from torch.distributions import Normal, kl_divergence

from flcore.config import BetaSchedule, GeneratorConfig, KlReduction, Likelihood, validate
from flcore.errors import ConfigError
from flcore.trainmodel.generators import (
    BetaScheduler,
    GeneratorBank,
    GeneratorData,
    GeneratorSpec,
    MaskedAdam,
    VAEGenerator,
    VAELoss,
    _slice,
    clip_per_generator,
    train_generators,
    vae_loss,
    warmup_epochs,
)


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
    loss = VAELoss(10, 0.5, similarity_weight=0.1, likelihood=Likelihood.mse)
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
    mean_kl = VAELoss(10, 0.5, kl_reduction=KlReduction.mean)(recon, x, mu, logvar, 1, mask)
    torch.testing.assert_close(mean_kl.kl, terms.kl / 4)


def test_kl_is_zero_at_the_prior() -> None:
    zeros = torch.zeros(1, 2, 3)
    terms = VAELoss(1, 1.0)(zeros, zeros + 1, zeros, zeros, 0, torch.ones(1, 2, dtype=bool))
    assert terms.kl.item() == 0.0


def test_gaussian_likelihood_is_the_negative_elbo() -> None:
    """``likelihood=gaussian`` (sigma-VAE): recon is ``-log N(x; x_hat, sigma^2)`` summed over the
    features (``[S, D]`` flattened) and averaged over each generator's real rows, with sigma^2
    floored at ``variance_floor``; KL is ``KL(q(z|x) || N(0, I))`` summed over latent
    dimensions; total = recon + beta x KL, with no similarity term."""
    torch.manual_seed(0)
    x, recon = torch.randn(3, 4, 2, 5), torch.randn(3, 4, 2, 5)
    mu, logvar = torch.randn(3, 4, 6), torch.randn(3, 4, 6)
    recon_logvar = torch.tensor([-1.0, 0.5, -20.0]).view(3, 1, 1)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    loss = VAELoss(10, 0.5, similarity_weight=0.1, likelihood=Likelihood.gaussian,
                   variance_floor=1e-4)
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
    with pytest.raises(ValueError, match="learned_variance"):
        loss(recon, x, mu, logvar, epoch=1, mask=mask)


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
        loss = VAELoss(10, 0.5, kl_reduction=reduction, likelihood=likelihood,
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
                                         "generator.free_bits=0.25")).generator, 10)
    assert (loss.likelihood, loss.free_bits) == (Likelihood.mse, 0.25)
    for override, message in (("generator.free_bits=-0.1", "generator.free_bits=-0.1: must be"),
                              ("generator.variance_floor=0", "generator.variance_floor=0")):
        with pytest.raises(ConfigError) as err:
            validate(make_config(override))
        assert message in str(err.value) and "\n" not in str(err.value)


def test_masked_adam_equals_torch_adam_per_generator() -> None:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(2, 3))
    single = [torch.nn.Parameter(weight[k].detach().clone()) for k in range(2)]
    masked = MaskedAdam([weight], k=2, lr=0.01)
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


def test_per_generator_clipping_matches_clip_grad_norm() -> None:
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.zeros(3, 4, 2)), torch.nn.Parameter(torch.zeros(3, 1, 2))
    w.grad, b.grad = torch.randn(3, 4, 2) * 5, torch.randn(3, 1, 2) * 5
    expected = []
    for k in range(3):
        pw, pb = torch.nn.Parameter(w[k].detach()), torch.nn.Parameter(b[k].detach())
        pw.grad, pb.grad = w.grad[k].clone(), b.grad[k].clone()
        torch.nn.utils.clip_grad_norm_([pw, pb], 1.0)
        expected.append((pw.grad, pb.grad))
    clip_per_generator([w, b], 1.0)
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


def _train(model: VAEGenerator, data: GeneratorData, seeds: list[int], epochs: int = 6,
           likelihood: Likelihood = Likelihood.mse) -> list:
    optimizer = MaskedAdam(list(model.parameters()), model.k, lr=0.01)
    rngs = [torch.Generator().manual_seed(s) for s in seeds]
    loss = VAELoss(epochs, 0.5, likelihood=likelihood)
    return train_generators(model, optimizer, loss, data, epochs, batch_size=4, grad_clip=1.0,
                            rngs=rngs)


@pytest.mark.parametrize("likelihood", list(Likelihood))
def test_batched_training_equals_one_by_one(likelihood: Likelihood) -> None:
    """K generators with unequal data, trained together, match each trained alone (with the
    Gaussian likelihood, their learned variances too)."""
    counts = [9, 4, 13]
    data = _data(counts)
    learned = likelihood is Likelihood.gaussian
    torch.manual_seed(2)
    batched = VAEGenerator(3, 12, 16, 3, learned_variance=learned)
    initial = {k: v.clone() for k, v in batched.state_dict().items()}
    logs = _train(batched, data, seeds=[10, 11, 12], likelihood=likelihood)
    assert ("dec_logvar" in initial) == learned
    if learned:
        assert (batched.dec_logvar.abs() > 0.02).all()
    for k, n in enumerate(counts):
        alone = VAEGenerator(1, 12, 16, 3, learned_variance=learned)
        alone.load_state_dict({name: v[k : k + 1].clone() for name, v in initial.items()})
        alone_logs = _train(alone, GeneratorData(data.x[k : k + 1, :n], torch.tensor([n])),
                            seeds=[10 + k], likelihood=likelihood)
        for name, value in alone.state_dict().items():
            torch.testing.assert_close(batched.state_dict()[name][k : k + 1], value,
                                       rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(logs[-1].total[k], alone_logs[-1].total[0],
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logs[-1].mse[k], alone_logs[-1].mse[0], rtol=1e-5, atol=1e-6)


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
        optimizer = MaskedAdam(list(model.parameters()), 2, lr=0.01)
        rngs = [torch.Generator().manual_seed(seed + k) for k in range(2)]
        logs = train_generators(model, optimizer, VAELoss(3, 0.5), data, 3, 4, 1.0, rngs,
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
    bank.fit(x, y, None, vae_loss(config, config.training_epochs), rngs, where="node 3, round 1: ")
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
        config = GeneratorConfig(likelihood=likelihood, training_epochs=30, hidden_dim=64,
                                 latent_dim=8, lr=0.003)
        bank = _fit(config, x, y)
        data = bank.data(x, y, None)
        with torch.no_grad():
            mu, _ = bank.model.encode(data.x)
        active[likelihood] = (mu.var(1) > 0.01).sum(-1)
    assert (active[Likelihood.gaussian] > 1).all(), active
    assert (active[Likelihood.mse] == 0).all(), active


def test_a_generator_at_the_variance_floor_is_named(caplog: pytest.LogCaptureFixture) -> None:
    """Identical rows let the decoder reconstruct exactly, so its learned variance falls to the
    floor (0.5 here, reached in few steps); the warning names the node and that generator only
    (the other class varies by far more than the floor)."""
    x, y = _low_rank_classes(64, 32, 2, (0.0, 2.0))
    config = GeneratorConfig(training_epochs=20, hidden_dim=16, latent_dim=4, lr=0.05,
                             variance_floor=0.5)
    with caplog.at_level(logging.WARNING, logger="flcore.trainmodel.generators"):
        bank = _fit(config, x, y)
    assert bank.model.dec_logvar[0].item() <= math.log(0.5) < bank.model.dec_logvar[1].item()
    floors = [r.getMessage() for r in caplog.records if "variance_floor" in r.getMessage()]
    assert floors == [floors[0]] and floors[0].startswith("node 3, round 1: generator class0:")


def test_the_learned_variance_travels_with_the_decoder() -> None:
    """``dec_logvar`` is sliced with its generator and sent in the decoder package; a bank built
    from the package samples what the sender would."""
    x, y = _low_rank_classes(32, 16, 2, (1.0, 1.0))
    config = GeneratorConfig(training_epochs=3, hidden_dim=16, latent_dim=4, lr=0.05)
    bank = _fit(config, x, y)
    one = _slice(bank.model, 1)
    assert one.dec_logvar.data_ptr() == bank.model.dec_logvar[1:2].data_ptr()
    package = bank.decoder_package()
    received = GeneratorBank.from_decoder(package, config, torch.device("cpu"))
    torch.testing.assert_close(received.model.dec_logvar, bank.model.dec_logvar)
    assert (bank.model.dec_logvar != 0).all()
    counts = {0: 3, 1: 2}
    sent = bank.sample(counts, None, {}, torch.Generator().manual_seed(7))
    got = received.sample(counts, None, {}, torch.Generator().manual_seed(7))
    torch.testing.assert_close(sent[0], got[0])
    torch.testing.assert_close(sent[1], got[1])
