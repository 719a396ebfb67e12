"""Generator metrics against reference implementations (prdc, scipy, torch.distributions), closed
forms and direct double-loop formulas."""

import math

import numpy as np
import prdc
import pytest
import scipy.linalg
import torch
from scipy.spatial.distance import pdist
from torch.distributions import Normal, kl_divergence

from flcore.errors import FedA2VError, TrainingError
from flcore.metrics.generative import (
    NonFiniteRows,
    UndefinedMetric,
    active_units,
    coverage,
    dcr_ratio,
    density,
    frechet_distance,
    generator_report,
    kl_per_dimension,
    latent_usage,
    mean_cosine_similarity,
    mean_l2_distance,
    mean_pairwise_distance,
    mmd2,
    near_copy_share,
    one_nn_accuracy,
    pairwise_distances,
    precision,
    recall,
    spread_ratio,
    training_distances,
)
from flcore.servers import generator_quality


def gaussian(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64) + shift


# precision, recall, density, coverage


@pytest.mark.parametrize(("n", "m", "d", "k"), [(50, 60, 8, 1), (100, 80, 16, 5),
                                                (200, 300, 64, 10), (30, 30, 3, 3),
                                                (40, 200, 128, 5)])
def test_prdc_matches_the_prdc_package(n: int, m: int, d: int, k: int) -> None:
    real, fake = gaussian(n, d, 0), gaussian(m, d, 1, shift=0.3) * 1.2
    expected = prdc.compute_prdc(real.numpy(), fake.numpy(), nearest_k=k)
    pair = pairwise_distances(real, fake)
    assert precision(pair, k) == pytest.approx(expected["precision"], abs=1e-6)
    assert recall(pair, k) == pytest.approx(expected["recall"], abs=1e-6)
    assert density(pair, k) == pytest.approx(expected["density"], abs=1e-6)
    assert coverage(pair, k) == pytest.approx(expected["coverage"], abs=1e-6)


# Fréchet distance


def reference_fd(x: np.ndarray, y: np.ndarray, trace_sqrt: float) -> float:
    mean = np.sum((x.mean(0) - y.mean(0)) ** 2)
    return float(mean + np.trace(np.cov(x.T)) + np.trace(np.cov(y.T)) - 2 * trace_sqrt)


def test_fd_matches_the_gaussian_closed_form() -> None:
    # N(0, Q diag(s1²) Qᵀ) vs N(mu, Q diag(s2²) Qᵀ): commuting covariances, so
    # FD = ‖mu‖² + Σ (s1 − s2)². With 200 000 rows in 8 dimensions each estimated moment is off
    # by ~1/√n ≈ 0.002 relative, so 1% of the value (≈ 6.2) is several standard errors.
    d, n = 8, 200_000
    s1 = torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    s2 = torch.linspace(1.5, 0.8, d, dtype=torch.float64)
    mu = torch.full((d,), 0.5, dtype=torch.float64)
    q = torch.linalg.qr(gaussian(d, d, 2)).Q
    x = (gaussian(n, d, 3) * s1) @ q.T
    y = (gaussian(n, d, 4) * s2) @ q.T + mu
    expected = float(mu.square().sum() + (s1 - s2).square().sum())
    assert frechet_distance(x, y) == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize(("n", "m", "d"), [(500, 400, 20), (300, 300, 64), (100, 2000, 50)])
def test_fd_matches_scipy_sqrtm_when_rows_exceed_dimensions(n: int, m: int, d: int) -> None:
    x, y = gaussian(n, d, 5), gaussian(m, d, 6, shift=0.2) * 0.7
    c1, c2 = np.cov(x.numpy().T), np.cov(y.numpy().T)
    trace_sqrt = np.trace(scipy.linalg.sqrtm(c1 @ c2)).real
    expected = reference_fd(x.numpy(), y.numpy(), trace_sqrt)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)


def psd_sqrt(c: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(c)
    return (vectors * np.sqrt(values.clip(min=0))) @ vectors.T


@pytest.mark.parametrize(("n", "m", "d"), [(30, 50, 200), (40, 200, 512), (300, 20, 100)])
def test_fd_low_rank_matches_the_full_d_by_d_path(n: int, m: int, d: int) -> None:
    # Full path: tr √(C1 C2) = tr √(C1^½ C2 C1^½), symmetric d x d square roots through eigh
    # (singular covariances: n or m < d). The reference's own error bounds the tolerance: its
    # d − n zero eigenvalues come out as rounding noise of ~ε·λ_max, whose square roots add
    # ~√ε relative each (observed: 2e-8).
    x, y = gaussian(n, d, 7), gaussian(m, d, 8, shift=0.1) * 1.3
    c1, c2 = np.cov(x.numpy().T), np.cov(y.numpy().T)
    root = psd_sqrt(c1)
    trace_sqrt = np.sqrt(np.linalg.eigvalsh(root @ c2 @ root).clip(min=0)).sum()
    expected = reference_fd(x.numpy(), y.numpy(), trace_sqrt)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-6)


def test_fd_of_a_set_with_itself_is_zero() -> None:
    x = gaussian(40, 4096, 9)
    assert abs(frechet_distance(x, x)) < 1e-8 * frechet_distance(x, gaussian(40, 4096, 10))


# MMD²


def rbf(a: torch.Tensor, b: torch.Tensor, sigma: float) -> float:
    return math.exp(-float((a - b).square().sum()) / (2 * sigma**2))


def test_mmd_matches_the_double_loop_formula() -> None:
    x, y = gaussian(15, 5, 11), gaussian(20, 5, 12, shift=0.4)
    distances = pdist(torch.cat([x, y]).numpy())  # 595 pairs: an odd count, one middle value
    sigma = float(np.median(distances))
    n, m = len(x), len(y)
    xx = sum(rbf(x[i], x[j], sigma) for i in range(n) for j in range(n) if i != j)
    yy = sum(rbf(y[i], y[j], sigma) for i in range(m) for j in range(m) if i != j)
    xy = sum(rbf(x[i], y[j], sigma) for i in range(n) for j in range(m))
    expected = xx / (n * (n - 1)) + yy / (m * (m - 1)) - 2 * xy / (n * m)
    result = mmd2(pairwise_distances(x, y))
    assert result.bandwidth == pytest.approx(sigma, rel=1e-12)
    assert result.value == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert result.p_value is None


def test_mmd_is_near_zero_for_one_distribution_and_the_test_detects_a_shift() -> None:
    real = gaussian(300, 16, 13)
    same = mmd2(pairwise_distances(real, gaussian(300, 16, 14)), 200,
                torch.Generator().manual_seed(0))
    shifted = mmd2(pairwise_distances(real, gaussian(300, 16, 15, shift=0.5)), 200,
                   torch.Generator().manual_seed(0))
    assert abs(same.value) < 0.05 * shifted.value
    assert shifted.p_value == pytest.approx(1 / 201)
    assert same.p_value is not None and same.p_value > 0.1


# Latent usage


def test_kl_per_dimension_matches_torch_distributions() -> None:
    mu, logvar = gaussian(64, 10, 16), gaussian(64, 10, 17)
    expected = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).mean(0)
    torch.testing.assert_close(kl_per_dimension(mu, logvar), expected, rtol=1e-12, atol=1e-12)
    usage = latent_usage(mu, logvar, where="node 0")
    assert usage.values["kl"] == pytest.approx(float(expected.sum()), rel=1e-12)


def test_active_units_counts_dimensions_whose_posterior_mean_varies() -> None:
    # Dimensions 0, 2, 5 vary over the data (variance ≈ 1); the rest hardly (variance ≈ 1e-4).
    scale = torch.full((8,), 0.01, dtype=torch.float64)
    scale[[0, 2, 5]] = 1.0
    mu = gaussian(500, 8, 18) * scale + 3.0
    assert active_units(mu) == 3
    assert active_units(mu, threshold=1e-6) == 8
    assert active_units(mu) == int((np.var(mu.numpy(), axis=0, ddof=1) > 0.01).sum())
    assert latent_usage(mu, torch.zeros_like(mu), where="node 0").values["active_units"] == 3


# 1-NN two-sample accuracy


def test_one_nn_accuracy_by_hand() -> None:
    real = torch.tensor([[0.0], [0.1], [3.0]])
    generated = torch.tensor([[1.0], [1.25], [3.1], [1.1]])
    # Real: 0 and 0.1 have real neighbours, 3.0 a generated one (2/3). Generated: 1.0, 1.25 and
    # 1.1 have generated neighbours, 3.1 a real one (3/4). Balanced: the mean of the two.
    assert one_nn_accuracy(pairwise_distances(real, generated)) == pytest.approx((2 / 3 + 3 / 4)
                                                                                 / 2)


def test_one_nn_accuracy_separated_and_indistinguishable() -> None:
    real = gaussian(1000, 8, 19)
    assert one_nn_accuracy(pairwise_distances(real, gaussian(1000, 8, 20, shift=10))) == 1.0
    assert one_nn_accuracy(pairwise_distances(real, gaussian(1000, 8, 21))) == pytest.approx(
        0.5, abs=0.03)
    # Unequal sizes: plain accuracy would be ≈ 0.72 by chance; the balanced one stays ≈ 0.5.
    assert one_nn_accuracy(pairwise_distances(real[:300], gaussian(1500, 8, 22))) == (
        pytest.approx(0.5, abs=0.04))


# Memorization


def test_dcr_ratio_and_near_copies() -> None:
    train, held_out = gaussian(300, 64, 23), gaussian(300, 64, 24)
    copies = train[:200] + 1e-3 * gaussian(200, 64, 25)
    fresh = gaussian(300, 64, 26)
    copied = training_distances(copies, train, held_out)
    assert dcr_ratio(copied) < 0.01
    assert near_copy_share(copied) == 1.0
    drawn = training_distances(fresh, train, held_out)
    assert dcr_ratio(drawn) == pytest.approx(1.0, abs=0.05)
    assert near_copy_share(drawn) == 0.0


# Diversity and class means


def test_diversity_and_class_means() -> None:
    real = gaussian(2000, 32, 27)
    generated = gaussian(2000, 32, 28) * 0.5 + 1.0
    assert spread_ratio(real, generated) == pytest.approx(0.5, abs=0.02)
    # E‖x − x'‖ for x, x' ~ N(0, s²I_d) is s·√2·√2·Γ((d+1)/2)/Γ(d/2).
    chi = math.sqrt(2) * math.exp(math.lgamma(16.5) - math.lgamma(16))
    pair = pairwise_distances(real, generated)
    assert mean_pairwise_distance(pair) == pytest.approx(0.5 * math.sqrt(2) * chi, rel=0.01)
    a, b = real.mean(0), generated.mean(0)
    assert mean_l2_distance(real, generated) == pytest.approx(float((a - b).norm()), rel=1e-12)
    assert mean_cosine_similarity(real, generated) == pytest.approx(
        float(torch.nn.functional.cosine_similarity(a, b, dim=0)), rel=1e-12)


# The report


def test_report_pools_the_union_and_keys_map_to_gen_names() -> None:
    real = {"dog": gaussian(40, 64, 29), "rain": gaussian(40, 64, 30, shift=1.0)}
    generated = {"dog": gaussian(60, 64, 31), "rain": gaussian(60, 64, 32, shift=1.0)}
    train = {"dog": gaussian(40, 64, 33), "rain": gaussian(40, 64, 34, shift=1.0)}
    report = generator_report(real, generated, train, where="node 1", k=5, permutations=50)
    pooled = report["pooled"]
    assert {"fd", "mmd", "precision", "recall", "density", "coverage", "one_nn_acc",
            "dcr_ratio", "spread_ratio", "count"} <= pooled.keys()
    assert pooled["count"] == 120
    union_real = torch.cat(list(real.values()))
    union_generated = torch.cat(list(generated.values()))
    assert pooled["fd"] == pytest.approx(frechet_distance(union_real, union_generated))
    assert pooled["precision"] == pytest.approx(
        precision(pairwise_distances(union_real, union_generated), 5))
    assert report["per_class"]["dog"]["fd"] == pytest.approx(
        frechet_distance(real["dog"], generated["dog"]))
    assert 0 <= pooled["mmd_pvalue"] <= 1
    assert report["undefined"] == {"per_class": {}, "pooled": {}}


def test_report_caps_large_sets_with_a_seeded_subsample() -> None:
    real, generated = {"a": gaussian(50, 16, 35)}, {"a": gaussian(500, 16, 36)}
    first = generator_report(real, generated, where="node 0", max_rows=100, seed=3)
    again = generator_report(real, generated, where="node 0", max_rows=100, seed=3)
    assert first == again
    assert first["pooled"]["count"] == 500
    assert first["pooled"]["fd"] != pytest.approx(frechet_distance(real["a"], generated["a"]))


def test_report_gives_reasons_for_undefined_metrics() -> None:
    real = {"big": gaussian(40, 32, 37), "small": gaussian(3, 32, 38), "one": gaussian(1, 32, 39)}
    generated = {"big": gaussian(40, 32, 40), "small": gaussian(40, 32, 41),
                 "one": gaussian(40, 32, 42), "unseen": gaussian(10, 32, 43)}
    report = generator_report(real, generated, None, where="node 2", k=5)
    small = report["per_class"]["small"]
    assert small["precision"] is None and small["coverage"] is None
    assert small["recall"] is not None and small["fd"] is not None
    reasons = report["undefined"]["per_class"]["small"]
    assert "6 or more real rows" in reasons["precision"]
    assert "no training rows" in reasons["dcr_ratio"]
    assert report["per_class"]["one"]["fd"] is None
    assert "2 or more real rows" in report["undefined"]["per_class"]["one"]["fd"]
    unseen = report["per_class"]["unseen"]
    assert unseen["count"] == 10 and unseen["mmd"] is None and unseen["one_nn_acc"] is None
    assert report["pooled"]["fd"] is not None
    with pytest.raises(UndefinedMetric, match="2 or more generated rows"):
        frechet_distance(real["big"], generated["big"][:1])


def test_nan_in_generated_samples_names_node_and_generator() -> None:
    """Metrics raise a plain ValueError; the run that called them makes it a TrainingError."""
    generated = gaussian(20, 8, 44)
    generated[3, 2] = math.nan
    with pytest.raises(NonFiniteRows, match="node 4, server generators, class dog") as err:
        generator_report({"dog": gaussian(20, 8, 45)}, {"dog": generated},
                         where="node 4, server generators")
    assert isinstance(err.value, ValueError) and not isinstance(err.value, FedA2VError)
    with pytest.raises(NonFiniteRows, match="node 4, generator dog"):
        latent_usage(generated, torch.zeros_like(generated), where="node 4, generator dog")


def test_the_generator_metrics_on_demand() -> None:
    """``evaluate_generator_quality`` / ``evaluate_generator_diversity`` on any tensors, checked
    against torch computations written here."""
    from flcore.servers.generator_quality import (
        evaluate_generator_diversity,
        evaluate_generator_quality,
    )

    torch.manual_seed(0)
    real, generated = torch.randn(30, 4, 8), torch.randn(50, 4, 8) * 0.5 + 1.0
    scores = evaluate_generator_quality(real_embeddings=real, generated_embeddings=generated,
                                        metrics=["l2_distance", "cosine_similarity"])
    real_mean, generated_mean = real.flatten(1).mean(0), generated.flatten(1).mean(0)
    assert set(scores) == {"l2_distance", "cosine_similarity"}
    assert scores["l2_distance"] == pytest.approx(float((real_mean - generated_mean).norm()))
    assert scores["cosine_similarity"] == pytest.approx(float(
        torch.nn.functional.cosine_similarity(real_mean, generated_mean, dim=0)))
    assert scores == evaluate_generator_quality(real, generated,
                                                ["l2_distance", "cosine_similarity"])
    everything = evaluate_generator_quality(real, generated)
    assert {"fd", "mmd", "precision", "recall", "coverage", "spread_ratio"} <= set(everything)
    with pytest.raises(ValueError, match="unknown generator metric"):
        evaluate_generator_quality(real, generated, ["l2"])
    diversity = evaluate_generator_diversity(generated_embeddings=generated)
    rows = generated.flatten(1).double()
    assert diversity["std"] == pytest.approx(float(rows.std(0).mean()))
    distances = torch.cdist(rows, rows)
    assert diversity["pairwise_distance"] == pytest.approx(float(distances.sum() / (50 * 49)))


def test_the_run_turns_non_finite_rows_into_a_training_error(monkeypatch) -> None:
    """Generator scoring in a run stops it with a TrainingError carrying the metrics' line."""
    def nan_rows(*args: object) -> None:
        raise NonFiniteRows("node 4, generator dog: samples contain NaN")

    monkeypatch.setattr(generator_quality, "_score_generators", nan_rows)
    with pytest.raises(TrainingError, match="node 4, generator dog: samples contain NaN"):
        generator_quality.score_generators([], {}, None, None, 1)  # type: ignore[arg-type]
