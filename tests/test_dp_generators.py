"""DP-SGD of the VAE generator banks: the clipped sums of a stacked bank against per-sample
gradients of each generator alone (torch.func), one private step against Opacus'
GradSampleModule and DPOptimizer, stacked against one-by-one training, and the composed
accounting against Google's dp_accounting."""

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

opacus = pytest.importorskip("opacus")
dp_accounting = pytest.importorskip("dp_accounting")

from conftest import QUICK, TINY_GENERATORS, interrupt_in_round  # noqa: E402
from flcore.clients.protocol import PrivacySpec  # noqa: E402
from flcore.config import (  # noqa: E402
    BetaSchedule,
    DecoderVariance,
    GeneratorConfig,
    Likelihood,
)
from flcore.errors import RunInterrupted  # noqa: E402
from flcore.privacy import accounting  # noqa: E402
from flcore.privacy.accounting import Use  # noqa: E402
from flcore.privacy.dpsgd import noisy_mean  # noqa: E402
from flcore.privacy.generator_training import clipped_sums  # noqa: E402
from flcore.trainmodel.banks import fit_together  # noqa: E402
from flcore.trainmodel.generators import GeneratorBank, GeneratorSpec, slice_generator  # noqa: E402
from flcore.trainmodel.vae import BetaScheduler, VAEGenerator, VAELoss  # noqa: E402


def learned_loss() -> VAELoss:
    return VAELoss(BetaScheduler(BetaSchedule.constant, 1, 1.0, beta_max=2.0),
                   likelihood=Likelihood.gaussian, decoder_variance=DecoderVariance.learned,
                   free_bits=0.05)


def test_clipped_sums_of_a_stack_equal_each_generator_alone(float64) -> None:
    """Three conditional generators with a learned variance, unequal Poisson samples: the
    stack's ghost-clipped sums equal the sums of per-sample gradients of each generator on each
    row alone (torch.func), clipped to norm 0.7 over all of that generator's parameters."""
    torch.manual_seed(0)
    model = VAEGenerator(3, 6, 5, 3, cond=2, learned_variance=True)
    with torch.no_grad():
        model.dec_logvar.copy_(torch.tensor([0.3, -0.5, 0.1]).view(3, 1, 1))
    loss = learned_loss()
    x, noise, cond = torch.randn(3, 4, 6), torch.randn(3, 4, 3), torch.randn(3, 4, 2)
    counted = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    got, terms = clipped_sums(model, loss, x, noise, cond, 0, counted, 0.7)
    names = [n for n, _ in model.named_parameters()]
    for k in range(3):
        one = slice_generator(model, k)
        params = {n: p.detach() for n, p in one.named_parameters()}

        def row_loss(p: dict, xi: torch.Tensor, zi: torch.Tensor, ci: torch.Tensor,
                     one: VAEGenerator = one) -> torch.Tensor:
            recon, mu, logvar = functional_call(one, p, (xi.view(1, 1, -1), zi.view(1, 1, -1),
                                                         ci.view(1, 1, -1)))
            return loss(recon, xi.view(1, 1, -1), mu, logvar, 0,
                        torch.ones(1, 1, dtype=torch.bool), p["dec_logvar"]).total.sum()

        per = vmap(grad(row_loss), in_dims=(None, 0, 0, 0))(params, x[k], noise[k], cond[k])
        norms = torch.stack([per[n].flatten(1).norm(dim=1) for n in names]).norm(dim=0)
        scale = (0.7 / (norms + 1e-6)).clamp(max=1.0) * counted[k]
        for name, ours in zip(names, got, strict=True):
            want = torch.einsum("b,b...->...", scale, per[name])
            torch.testing.assert_close(ours[k], want.view_as(ours[k]), rtol=1e-9, atol=1e-12)
    assert terms.shape == (7, 3, 4)


class Outputs(nn.Module):
    """A one-generator bank as Opacus wraps it: rows on axis 1 (``batch_first=False``)."""

    def __init__(self, model: VAEGenerator) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model(x, noise)


def mse_row_losses(recon: torch.Tensor, x: torch.Tensor, mu: torch.Tensor,
                   logvar: torch.Tensor, beta: float, similarity: float) -> torch.Tensor:
    """Each row's MSE-likelihood VAE loss, written out: mean squared error, beta times the KL
    to N(0, I), and ``similarity`` times one minus the cosine."""
    mse = (recon - x).square().mean(-1)
    kl = (-0.5 * (1 + logvar - mu.square() - logvar.exp())).sum(-1)
    cosine = nn.functional.cosine_similarity(recon, x, dim=-1)
    return mse + beta * kl + similarity * (1 - cosine)


def test_a_private_step_equals_opacus_dp_optimizer(float64) -> None:
    """One generator, eight rows: Opacus' clipped, noised gradients (clip 0.5, noise 1.3,
    expected batch 6, noise from a seeded generator) equal ours from the same draws."""
    torch.manual_seed(3)
    model = VAEGenerator(1, 6, 5, 3)
    reference = VAEGenerator(1, 6, 5, 3)
    reference.load_state_dict(model.state_dict())
    x, noise = torch.randn(1, 8, 6), torch.randn(1, 8, 3)
    private = opacus.GradSampleModule(Outputs(reference), batch_first=False)
    optimizer = opacus.optimizers.DPOptimizer(
        torch.optim.SGD(private.parameters(), lr=0.1), noise_multiplier=1.3, max_grad_norm=0.5,
        expected_batch_size=6, generator=torch.Generator().manual_seed(7))
    recon, mu, logvar = private(x, noise)
    mse_row_losses(recon, x, mu, logvar, 2.0, 0.1).mean().backward()
    optimizer.pre_step()
    loss = VAELoss(BetaScheduler(BetaSchedule.constant, 1, 1.0, beta_max=2.0),
                   likelihood=Likelihood.mse, similarity_weight=0.1)
    summed, _ = clipped_sums(model, loss, x, noise, None, 0, torch.ones(1, 8, dtype=torch.bool),
                             0.5)
    got = noisy_mean(summed, 0.5, 1.3, torch.tensor([6.0]), [torch.Generator().manual_seed(7)])
    for ours, theirs in zip(got, [p.grad for p in private.parameters()], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


def bank(config: GeneratorConfig, classes: list[list[int]]) -> GeneratorBank:
    return GeneratorBank(GeneratorSpec([str(c) for c in classes], classes), 6, config, 0,
                         torch.device("cpu"))


def test_private_banks_train_alike_stacked_or_one_by_one(float64) -> None:
    """Two nodes' per-class banks (unequal classes and rows), three epochs of DP-SGD: trained as
    one stack or one bank at a time, each generator samples, noises and steps alike."""
    config = GeneratorConfig(training_epochs=3, hidden_dim=5, latent_dim=3, batch_size=4,
                             decoder_variance=DecoderVariance.learned)
    loss = VAELoss(BetaScheduler(BetaSchedule.linear, 3, 0.5), likelihood=Likelihood.gaussian,
                   decoder_variance=DecoderVariance.learned)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(11, 6, generator=g), torch.randn(7, 6, generator=g)]
    labels = [torch.tensor([0] * 6 + [1] * 5), torch.tensor([2] * 7)]
    spec = PrivacySpec(max_grad_norm=1.0, noise_multiplier=0.8)
    results = []
    for together in (True, False):
        torch.manual_seed(1)
        banks = [bank(config, [[0], [1]]), bank(config, [[2]])]
        rngs = [[torch.Generator().manual_seed(10 * i + k) for k in range(b.model.k)]
                for i, b in enumerate(banks)]
        if together:
            logs = fit_together(banks, xs, labels, [None, None], loss, rngs, ["a: ", "b: "],
                                privacy=spec)
        else:
            logs = [fit_together([b], [x], [y], [None], loss, [r], [w], privacy=spec)[0]
                    for b, x, y, r, w in zip(banks, xs, labels, rngs, ["a: ", "b: "],
                                             strict=True)]
        results.append((banks, logs))
    (stacked, stacked_logs), (alone, alone_logs) = results
    start = bank(config, [[0], [1]])
    for a, b in zip(stacked, alone, strict=True):
        for (name, p), q in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=name)
    assert not torch.equal(stacked[0].model.enc.weight, start.model.enc.weight)
    for a, b in zip(stacked_logs, alone_logs, strict=True):
        torch.testing.assert_close(a[-1].total, b[-1].total, rtol=1e-9, atol=1e-12)


def test_a_node_spends_its_adapter_composed_with_its_worst_generator() -> None:
    """A node's clip is in the adapter's rows and in one generator's: its epsilon is the
    largest, over its generators, of the adapter's steps composed with that generator's,
    as dp_accounting composes the same Poisson-sampled Gaussian events."""
    sigma, delta = 1.5, 1e-4
    ledger = accounting.Ledger(sigma, {0: Use(0.25, 8)}, {0: delta},
                               {0: [Use(0.5, 30), Use(1 / 3, 45)]})
    for _ in range(4):
        ledger.spend(0)
        ledger.spend_generators(0)
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))

    def google(rate: float, steps: int) -> float:
        event = dp_accounting.ComposedDpEvent([
            dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
                0.25, dp_accounting.GaussianDpEvent(sigma)), 32),
            dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
                rate, dp_accounting.GaussianDpEvent(sigma)), steps)])
        return dp_accounting.rdp.RdpAccountant(orders).compose(event).get_epsilon(delta)

    want = max(google(0.5, 120), google(1 / 3, 180))
    assert ledger.metrics()["privacy/epsilon/node0"] == pytest.approx(want, rel=1e-2)
    assert ledger.metrics()["privacy/epsilon"] > accounting.epsilon(sigma, 0.25, 32, delta)


#: A DP run with tiny per-class generators, two rounds, a checkpoint each.
GENERATOR_DP = (*QUICK, *TINY_GENERATORS, "federation.rounds=2", "federation.local_epochs=1",
                "checkpoint.every=1", "privacy=dp", "privacy.target_epsilon=4")


def test_a_dp_run_with_generators_spends_within_its_target(run_config: Callable) -> None:
    """``privacy=dp`` with per-class generators: the run ends within its target, and the noise
    is larger than the same run's without generators (every clip is also in a generator's rows
    and the two trainings compose)."""
    final = run_config(*GENERATOR_DP, folder="dp")["final"]
    adapters_only = run_config(*GENERATOR_DP, "generator=none", folder="adapters")["final"]
    assert 3.9 <= final["privacy/epsilon"] <= 4.0
    assert final["privacy/noise_multiplier"] > adapters_only["privacy/noise_multiplier"]
    assert final["gen/count"] > 0


@pytest.mark.slow
def test_a_dp_run_with_generators_resumes_exactly(run_config: Callable,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped by Ctrl-C in round 2 and resumed, a DP run with generators ends exactly where
    the straight one does, what each node spent included."""
    final = run_config(*GENERATOR_DP, folder="straight")["final"]
    with monkeypatch.context() as patch:
        interrupt_in_round(patch, 2)
        with pytest.raises(RunInterrupted):
            run_config(*GENERATOR_DP, folder="resumed")
    assert run_config(*GENERATOR_DP, "resume=true", folder="resumed")["final"] == final
