"""Beta schedules (the fix's specification), the VAE loss, and batched generator training."""

import itertools
import math

import pytest
import torch

from flcore.config import BetaSchedule, KlReduction
from flcore.trainmodel.generators import (
    BetaScheduler,
    GeneratorData,
    MaskedAdam,
    VAEGenerator,
    VAELoss,
    clip_per_generator,
    train_generators,
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
    loss = VAELoss(10, 0.5, similarity_weight=0.1)
    terms = loss(recon, x, mu, logvar, epoch=1, mask=mask)
    for g, n in ((0, 2), (1, 3)):
        mse = ((recon[g, :n] - x[g, :n]) ** 2).mean()
        kl = (-0.5 * (1 + logvar[g, :n] - mu[g, :n] ** 2 - logvar[g, :n].exp())).sum(-1).mean()
        sim = (1 - torch.cosine_similarity(recon[g, :n], x[g, :n], dim=-1)).mean()
        torch.testing.assert_close(terms.recon[g], mse)
        torch.testing.assert_close(terms.kl[g], kl)
        torch.testing.assert_close(terms.similarity[g], sim)
        torch.testing.assert_close(terms.total[g], mse + 0.4 * kl + 0.1 * sim)
    assert terms.beta == pytest.approx(0.4)
    mean_kl = VAELoss(10, 0.5, kl_reduction=KlReduction.mean)(recon, x, mu, logvar, 1, mask)
    torch.testing.assert_close(mean_kl.kl, terms.kl / 4)


def test_kl_is_zero_at_the_prior() -> None:
    zeros = torch.zeros(1, 2, 3)
    terms = VAELoss(1, 1.0)(zeros, zeros + 1, zeros, zeros, 0, torch.ones(1, 2, dtype=bool))
    assert terms.kl.item() == 0.0


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


def _train(model: VAEGenerator, data: GeneratorData, seeds: list[int], epochs: int = 6) -> list:
    optimizer = MaskedAdam(list(model.parameters()), model.k, lr=0.01)
    rngs = [torch.Generator().manual_seed(s) for s in seeds]
    return train_generators(model, optimizer, VAELoss(epochs, 0.5), data, epochs, batch_size=4,
                            grad_clip=1.0, rngs=rngs)


def test_batched_training_equals_one_by_one() -> None:
    """K generators with unequal data, trained together, match each trained alone."""
    counts = [9, 4, 13]
    data = _data(counts)
    torch.manual_seed(2)
    batched = VAEGenerator(3, 12, 16, 3)
    initial = {k: v.clone() for k, v in batched.state_dict().items()}
    logs = _train(batched, data, seeds=[10, 11, 12])
    for k, n in enumerate(counts):
        alone = VAEGenerator(1, 12, 16, 3)
        alone.load_state_dict({name: v[k : k + 1].clone() for name, v in initial.items()})
        alone_logs = _train(alone, GeneratorData(data.x[k : k + 1, :n], torch.tensor([n])),
                            seeds=[10 + k])
        for name, value in alone.state_dict().items():
            torch.testing.assert_close(batched.state_dict()[name][k : k + 1], value,
                                       rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(logs[-1].total[k], alone_logs[-1].total[0],
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
        optimizer = MaskedAdam(list(model.parameters()), 2, lr=0.01)
        rngs = [torch.Generator().manual_seed(seed + k) for k in range(2)]
        logs = train_generators(model, optimizer, VAELoss(3, 0.5), data, 3, 4, 1.0, rngs,
                                noise_std=noise)
        return logs[-1].total

    torch.testing.assert_close(final_loss(0.5), final_loss(0.5))
    assert not torch.allclose(final_loss(0.5), final_loss(0.0))
    assert (final_loss(2.0) > final_loss(0.0)).all()
