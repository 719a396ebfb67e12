"""The closed-form Gaussian generators and the class-agnostic noise control, checked against
numpy written independently."""

import numpy as np
import pytest
import torch

from flcore.errors import CheckpointError, ConfigError
from flcore.trainmodel.gaussian import (
    VARIANCE_FLOOR,
    GaussianBank,
    NoiseBank,
    canonical_signs,
)
from flcore.trainmodel.generators import GeneratorSpec

FEATURES = 6
# Generator "pair" covers classes 3 and 5; "rest" covers 7 (one row) and 9 (no rows).
SPEC = GeneratorSpec(["pair", "rest"], [[3, 5], [7, 9]])


def class_rows(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows of classes 3 (40 rows), 5 (25 rows) and 7 (one row), each around its own mean with
    its own per-feature scales, shuffled together."""
    rng = np.random.default_rng(seed)
    parts, labels = [], []
    for c, n in ((3, 40), (5, 25), (7, 1)):
        parts.append(rng.normal(c, rng.uniform(0.5, 2.0, FEATURES), size=(n, FEATURES)))
        labels += [c] * n
    order = rng.permutation(len(labels))
    return np.concatenate(parts)[order], np.array(labels)[order]


def fitted(covariance: str = "diagonal", rank: int = 0, seed: int = 0) -> GaussianBank:
    """A bank of SPEC fitted on :func:`class_rows`."""
    x, y = class_rows(seed)
    bank = GaussianBank(SPEC, FEATURES, covariance, rank)
    bank.fit(torch.tensor(x, dtype=torch.float32), torch.tensor(y), None, None, [], "")
    return bank


def model_of(bank: GaussianBank, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Class ``c``'s fitted mean and full covariance ``factor factor^T + diag(scale^2)``."""
    i = bank.model.classes.index(c)
    factor = bank.model.factor[i].double().numpy()
    scale = bank.model.scale[i].double().numpy()
    return bank.model.mean[i].double().numpy(), factor @ factor.T + np.diag(scale**2)


def test_diagonal_fit_is_numpys_mean_and_unbiased_variance_per_class() -> None:
    x, y = class_rows()
    bank = GaussianBank(SPEC, FEATURES)
    logs = bank.fit(torch.tensor(x, dtype=torch.float32), torch.tensor(y), None, None, [], "")
    assert logs == [] and bank.trainings == 1 and bank.dropped == [] and bank.model.k == 2
    for c in (3, 5):
        mean, cov = model_of(bank, c)
        np.testing.assert_allclose(mean, x[y == c].mean(0), rtol=1e-6)
        np.testing.assert_allclose(cov, np.diag(x[y == c].var(0, ddof=1)), rtol=1e-5)
    mean, cov = model_of(bank, 7)
    np.testing.assert_allclose(mean, x[y == 7][0], rtol=1e-6)
    np.testing.assert_allclose(cov, VARIANCE_FLOOR * np.eye(FEATURES), rtol=1e-5)
    assert bank.model.fitted == [True, True, True, False]


@pytest.mark.parametrize("rows", [3, 40])
def test_low_rank_of_full_rank_is_the_sample_covariance(rows: int) -> None:
    """With ``rank >= min(F, n - 1)`` nothing is discarded: the model is ``np.cov`` itself."""
    x = np.random.default_rng(1).normal(size=(rows, FEATURES)) @ np.diag(np.arange(1, 7))
    rank = min(FEATURES, rows - 1)
    bank = GaussianBank(GeneratorSpec(["all"], [[0]]), FEATURES, "low_rank", rank)
    bank.fit(torch.tensor(x, dtype=torch.float32), torch.zeros(rows, dtype=torch.long), None,
             None, [], "")
    mean, cov = model_of(bank, 0)
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False), rtol=1e-4, atol=1e-5)


def low_rank_fit(noise: np.ndarray, rank: int = 3, n: int = 40_000, seed: int = 2
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, GaussianBank]:
    """``n`` rows of ``N(mu, A A^T + diag(noise))`` (``A [F, rank]`` standard normal), the
    true covariance, ``A`` and a rank-``rank`` bank fitted on the rows."""
    rng = np.random.default_rng(seed)
    features = len(noise)
    a = rng.normal(size=(features, rank))
    x = (rng.normal(size=(n, rank)) @ a.T + rng.normal(size=(n, features)) * np.sqrt(noise)
         + rng.normal(size=features))
    bank = GaussianBank(GeneratorSpec(["all"], [[0]]), features, "low_rank", rank)
    bank.fit(torch.tensor(x, dtype=torch.float32), torch.zeros(n, dtype=torch.long), None, None,
             [], "")
    return x, a @ a.T + np.diag(noise), a, bank


def relative_error(estimate: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(estimate - reference) / np.linalg.norm(reference))


def test_low_rank_recovers_a_low_rank_plus_diagonal_model() -> None:
    """On many rows the rank-3 fit approaches ``np.cov`` (and the true covariance), keeps the
    sample's variances exactly, and its directions span ``A``'s."""
    x, truth, a, bank = low_rank_fit(np.random.default_rng(4).uniform(0.2, 0.6, 16))
    _, cov = model_of(bank, 0)
    assert relative_error(cov, np.cov(x, rowvar=False)) < 0.03
    assert relative_error(cov, truth) < 0.03
    np.testing.assert_allclose(np.diag(cov), x.var(0, ddof=1), rtol=1e-5)
    true_basis, _ = np.linalg.qr(a)
    fitted_basis, _ = np.linalg.qr(bank.model.factor[0].double().numpy())
    gap = np.linalg.norm(true_basis @ true_basis.T - fitted_basis @ fitted_basis.T, 2)
    assert gap < 0.05  # the sine of the largest principal angle between the subspaces


def test_low_rank_is_as_close_to_a_ppca_model_as_the_sample_covariance() -> None:
    """With isotropic noise (probabilistic PCA's model) the rank-3 fit is as close to the true
    covariance as ``np.cov`` of the same rows: the discarded variance is taken out of the
    directions, not counted twice."""
    x, truth, _, bank = low_rank_fit(np.ones(16))
    _, cov = model_of(bank, 0)
    assert relative_error(cov, truth) < 1.2 * relative_error(np.cov(x, rowvar=False), truth)


def test_fitted_directions_do_not_depend_on_the_svds_signs() -> None:
    """Any sign flip of the directions gives the same canonical directions, whose largest
    entries (by magnitude) are positive."""
    directions = np.random.default_rng(3).normal(size=(FEATURES, 3))
    flipped = directions * np.array([-1.0, 1.0, -1.0])
    ours = canonical_signs(torch.tensor(directions)).numpy()
    np.testing.assert_array_equal(ours, canonical_signs(torch.tensor(flipped)).numpy())
    assert np.all(ours[np.abs(ours).argmax(0), np.arange(3)] > 0)
    np.testing.assert_array_equal(np.abs(ours), np.abs(directions))


def test_a_refit_replaces_only_the_classes_with_rows() -> None:
    bank = fitted()
    before = model_of(bank, 3)
    x, y = class_rows(seed=5)
    keep = y == 5
    bank.fit(torch.tensor(x[keep], dtype=torch.float32), torch.tensor(y[keep]), None, None, [],
             "")
    assert bank.trainings == 2
    np.testing.assert_array_equal(model_of(bank, 3)[0], before[0])
    np.testing.assert_allclose(model_of(bank, 5)[0], x[keep].mean(0), rtol=1e-6)


def test_sample_draws_exactly_the_requested_rows_of_fitted_classes() -> None:
    """Class 9 (never fitted) and 11 (not in the bank) give none; a count of 0 gives none."""
    bank = fitted()
    x, y = bank.sample({3: 4, 5: 0, 7: 6, 9: 5, 11: 2}, None, {}, torch.Generator().manual_seed(0))
    assert x.shape == (10, FEATURES) and x.dtype == torch.float32
    assert y.tolist() == [3] * 4 + [7] * 6
    x, y = bank.sample({9: 3}, None, {}, torch.Generator().manual_seed(0))
    assert x.shape == (0, FEATURES) and y.shape == (0,) and y.dtype == torch.long


@pytest.mark.parametrize(("covariance", "rank"), [("diagonal", 0), ("low_rank", 2)])
def test_large_samples_have_the_fitted_mean_and_covariance(covariance: str, rank: int) -> None:
    """Each entry within 5 standard errors: ``sqrt(C_ii / m)`` for the mean and
    ``sqrt((C_ij^2 + C_ii C_jj) / (m - 1))`` for the covariance of m Gaussian draws."""
    bank = fitted(covariance, rank)
    m = 50_000
    x, _ = bank.sample({5: m}, None, {}, torch.Generator().manual_seed(3))
    mean, cov = model_of(bank, 5)
    draws = x.double().numpy()
    variance = np.diag(cov)
    assert np.all(np.abs(draws.mean(0) - mean) < 5 * np.sqrt(variance / m))
    error = np.sqrt((cov**2 + np.outer(variance, variance)) / (m - 1))
    assert np.all(np.abs(np.cov(draws, rowvar=False) - cov) < 5 * error)


def test_samples_are_deterministic_per_seed() -> None:
    bank = fitted("low_rank", 2)
    counts = {3: 5, 5: 5, 7: 5}

    def draws(seed: int) -> torch.Tensor:
        return bank.sample(counts, None, {}, torch.Generator().manual_seed(seed))[0]

    assert torch.equal(draws(7), draws(7))
    assert not torch.equal(draws(7), draws(8))


@pytest.mark.parametrize(("covariance", "rank"), [("diagonal", 0), ("low_rank", 2)])
def test_state_dict_round_trip_gives_identical_samples(tmp_path, covariance: str,
                                                       rank: int) -> None:
    bank = fitted(covariance, rank)
    torch.save(bank.state_dict(), tmp_path / "bank.pt")
    restored = GaussianBank(SPEC, FEATURES, covariance, rank)
    restored.load_state_dict(torch.load(tmp_path / "bank.pt", weights_only=True))
    assert restored.trainings == 1 and restored.model.fitted == bank.model.fitted
    counts = {3: 5, 5: 4, 7: 3}
    ours = bank.sample(counts, None, {}, torch.Generator().manual_seed(1))
    theirs = restored.sample(counts, None, {}, torch.Generator().manual_seed(1))
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_decoder_package_round_trip_gives_identical_samples(tmp_path) -> None:
    bank = fitted("low_rank", 2)
    torch.save(bank.decoder_package(), tmp_path / "package.pt")
    package = torch.load(tmp_path / "package.pt", weights_only=True)
    received = GaussianBank.from_decoder(package, None, "cpu")
    assert received.spec == SPEC and received.dropped == [] and received.model.k == 2
    counts = {3: 5, 5: 4, 7: 3}
    ours = bank.sample(counts, None, {}, torch.Generator().manual_seed(2))
    theirs = received.sample(counts, None, {}, torch.Generator().manual_seed(2))
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_loading_gaussians_of_another_shape_is_refused() -> None:
    with pytest.raises(CheckpointError, match="covariance, rank"):
        GaussianBank(SPEC, FEATURES, "low_rank", 2).load_state_dict(fitted().state_dict())


@pytest.mark.parametrize(("covariance", "rank", "message"), [
    ("low_rank", FEATURES + 1, f"generator.gaussian_rank={FEATURES + 1}: .* from 1 to the 6 "),
    ("low_rank", 0, "generator.gaussian_rank=0: "),
    ("diagonal", 2, "generator.gaussian_rank=2: only .*low_rank has a rank"),
    ("full", 0, "generator.gaussian_covariance=full: use one of diagonal, low_rank"),
])
def test_bad_covariance_or_rank_is_refused_in_one_line(covariance: str, rank: int,
                                                       message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        GaussianBank(SPEC, FEATURES, covariance, rank)
    assert "\n" not in str(error.value)


@pytest.mark.gpu
def test_a_cuda_bank_fits_and_samples_as_a_cpu_bank() -> None:
    x, y = class_rows()
    counts = {3: 50, 5: 50, 7: 5}
    draws = []
    for device in ("cpu", "cuda"):
        bank = GaussianBank(SPEC, FEATURES, "low_rank", 2, device)
        bank.fit(torch.tensor(x, dtype=torch.float32, device=device),
                 torch.tensor(y, device=device), None, None, [], "")
        sx, sy = bank.sample(counts, None, {}, torch.Generator().manual_seed(4))
        assert sx.device.type == device and sy.device.type == device
        draws.append((sx.cpu(), sy.cpu()))
    torch.testing.assert_close(draws[0][0], draws[1][0], rtol=1e-4, atol=1e-4)
    assert torch.equal(draws[0][1], draws[1][1])


def test_gaussian_banks_of_several_nodes_fit_together_as_one_by_one() -> None:
    """``fit_together`` fits Gaussian banks one by one (closed form): the same Gaussians as
    each bank's own ``fit``, no epoch logs, one more training each."""
    from flcore.trainmodel.banks import fit_together

    data = [class_rows(seed) for seed in (0, 1)]
    xs = [torch.tensor(x, dtype=torch.float32) for x, _ in data]
    ys = [torch.tensor(y) for _, y in data]
    banks = [GaussianBank(SPEC, FEATURES, "low_rank", 2) for _ in data]
    logs = fit_together(banks, xs, ys, [None, None], None, [[], []], ["node 0: ", "node 1: "])
    assert logs == [[], []] and [bank.trainings for bank in banks] == [1, 1]
    for bank, seed in zip(banks, (0, 1), strict=True):
        alone = fitted("low_rank", 2, seed)
        for key in ("mean", "scale", "factor"):
            torch.testing.assert_close(getattr(bank.model, key), getattr(alone.model, key))
        assert bank.model.fitted == alone.model.fitted


def noise_bank() -> NoiseBank:
    """A noise bank of SPEC fitted on :func:`class_rows`."""
    x, y = class_rows()
    bank = NoiseBank(SPEC, FEATURES)
    assert bank.fit(torch.tensor(x, dtype=torch.float32), torch.tensor(y), None, None, [],
                    "") == []
    return bank


def test_noise_is_one_gaussian_of_every_row_whatever_its_class() -> None:
    """Every class that had rows gets the pooled mean and unbiased variance of all the rows."""
    x, _ = class_rows()
    bank = noise_bank()
    assert bank.model.fitted == [True, True, True, False] and bank.trainings == 1
    for c in (3, 5, 7):
        mean, cov = model_of(bank, c)
        np.testing.assert_allclose(mean, x.mean(0), rtol=1e-6)
        np.testing.assert_allclose(cov, np.diag(x.var(0, ddof=1)), rtol=1e-5)


def test_noise_samples_carry_no_class_information() -> None:
    """Each class's draws have the pooled mean (within 5 standard errors, sigma / sqrt(n)),
    whereas the classes' real means lie 2 apart; the requested counts label them."""
    x, _ = class_rows()
    n = 4000
    sx, sy = noise_bank().sample({3: n, 5: n, 7: n, 9: n}, None, {},
                                 torch.Generator().manual_seed(0))
    assert {c: int((sy == c).sum()) for c in (3, 5, 7, 9)} == {3: n, 5: n, 7: n, 9: 0}
    tolerance = 5 * x.std(0, ddof=1) / np.sqrt(n)
    for c in (3, 5, 7):
        mean = sx[sy == c].double().mean(0).numpy()
        assert (np.abs(mean - x.mean(0)) < tolerance).all(), c


def test_noise_bank_is_the_bank_of_model_noise_and_travels_as_a_decoder() -> None:
    from flcore.config import GeneratorConfig, GeneratorModel
    from flcore.trainmodel.banks import bank_from_decoder, new_bank

    config = GeneratorConfig(model=GeneratorModel.noise)
    assert type(new_bank(SPEC, FEATURES, config, 0, torch.device("cpu"))) is NoiseBank
    bank = noise_bank()
    received = bank_from_decoder(bank.decoder_package(), config, torch.device("cpu"))
    assert type(received) is NoiseBank
    counts = {3: 5, 5: 4, 7: 3}
    ours = bank.sample(counts, None, {}, torch.Generator().manual_seed(3))
    theirs = received.sample(counts, None, {}, torch.Generator().manual_seed(3))
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
