"""The DP-SGD step against Opacus' GradSampleModule and DPOptimizer, per-sample gradients of a
stack against each model alone, and the accounting against Google's dp_accounting."""

import re
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

opacus = pytest.importorskip("opacus")
dp_accounting = pytest.importorskip("dp_accounting")

from conftest import ADAPTERS_ONLY, QUICK, interrupt_in_round  # noqa: E402
from flcore.clients.protocol import AdapterJob, PrivacySpec, RoundSpec  # noqa: E402
from flcore.clients.training import training_seed  # noqa: E402
from flcore.config import AdapterConfig, validate  # noqa: E402
from flcore.errors import ConfigError, RunInterrupted  # noqa: E402
from flcore.executors.batched import Batched  # noqa: E402
from flcore.executors.sequential import Sequential  # noqa: E402
from flcore.privacy import accounting, training  # noqa: E402
from flcore.privacy.dpsgd import noisy_mean  # noqa: E402
from flcore.privacy.training import clipped_sums  # noqa: E402
from flcore.trainmodel.adapters import AdapterLoss, AudioAdapter, adapter_outputs  # noqa: E402
from test_executors import AUDIO, SEQUENCE, TEXT, federation, strategy_terms  # noqa: E402


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


def per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Per-sample gradients by torch.func (independent of Opacus' hooks)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def clipped(grads: dict, max_norm: float) -> list[torch.Tensor]:
    """Per-sample gradients ``[B, ...]`` clipped to ``max_norm`` over all of them (Opacus'
    factor ``max_norm / (norm + 1e-6)``, at most 1) and summed: ``[1, ...]`` each."""
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()]).norm(dim=0)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    return [torch.einsum("b,b...->...", scale, g).unsqueeze(0) for g in grads.values()]


def test_the_step_equals_opacus_dp_optimizer() -> None:
    """One DP-SGD step of an MLP on 8 rows: Opacus' gradients (clip 0.5, noise 1.3, expected
    batch 8, its noise drawn from a seeded generator) equal the clipped sum of torch.func's
    per-sample gradients made private by ours from the same draws."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
    model = mlp()
    private = opacus.GradSampleModule(mlp())
    optimizer = opacus.optimizers.DPOptimizer(
        torch.optim.SGD(private.parameters(), lr=0.1), noise_multiplier=1.3, max_grad_norm=0.5,
        expected_batch_size=8, generator=torch.Generator().manual_seed(7))
    nn.functional.cross_entropy(private(x), y).backward()
    optimizer.pre_step()  # clip, add noise, scale: the gradients SGD then steps with
    want = [p.grad for p in private.parameters()]
    got = noisy_mean(clipped(per_sample_grads(model, x, y), 0.5), 0.5, 1.3,
                     torch.tensor([8.0]), [torch.Generator().manual_seed(7)])
    for ours, theirs in zip(got, want, strict=True):
        torch.testing.assert_close(ours[0], theirs, rtol=1e-5, atol=1e-6)


def test_a_models_noise_is_its_own() -> None:
    """A model's noise is the same whatever is stacked beside it, drawn on one thread or
    several, and a model without a stream draws none."""
    g = torch.Generator().manual_seed(2)
    summed = [torch.randn(3, 4, 3, generator=g), torch.randn(3, 5, generator=g)]
    expected = torch.tensor([3.0, 1.0, 2.0])

    def streams() -> list[torch.Generator | None]:
        return [torch.Generator().manual_seed(5), None, torch.Generator().manual_seed(6)]

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = noisy_mean(summed, 1.0, 0.7, expected, streams())
        torch.set_num_threads(2)
        two = noisy_mean(summed, 1.0, 0.7, expected, streams())
    finally:
        torch.set_num_threads(previous)
    alone = noisy_mean([t[2:] for t in summed], 1.0, 0.7, expected[2:],
                       [torch.Generator().manual_seed(6)])
    for a, b, c, t in zip(one, two, alone, summed, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a[2:], c)
        torch.testing.assert_close(a[1], t[1] / 1.0)  # no stream: no noise


@pytest.mark.parametrize(("sigma", "rate", "steps"), [(1.0, 0.01, 1000), (1.1, 0.1, 120),
                                                      (2.0, 0.25, 40)])
def test_rdp_epsilon_equals_dp_accounting(sigma: float, rate: float, steps: int) -> None:
    """The same Poisson-sampled Gaussian composition through Google's RDP accountant, on
    Opacus' orders, gives the same epsilon to 1% (their conversions of RDP to (epsilon, delta)
    and their series for fractional orders differ in the last digits)."""
    delta = 1e-5
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        rate, dp_accounting.GaussianDpEvent(sigma)), steps)
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    google = dp_accounting.rdp.RdpAccountant(orders).compose(event).get_epsilon(delta)
    assert accounting.epsilon(sigma, rate, steps, delta) == pytest.approx(google, rel=1e-2)


def test_prv_and_rdp_agree_and_the_target_is_met() -> None:
    """The PRV accountant is tighter than RDP (never looser, within its error), and the noise
    found for a target epsilon spends at most that epsilon."""
    rdp = accounting.epsilon(1.0, 0.05, 500, 1e-5, "rdp")
    prv = accounting.epsilon(1.0, 0.05, 500, 1e-5, "prv")
    assert prv <= rdp * 1.01
    sigma = accounting.noise_for(4.0, 0.05, 500, 1e-5)
    assert 3.9 <= accounting.epsilon(sigma, 0.05, 500, 1e-5) <= 4.0
    history = accounting.History()
    history.add(sigma, 0.05, 200)
    history.add(sigma, 0.05, 300)
    assert history.entries == [(sigma, 0.05, 500)]
    assert history.epsilon(1e-5) == pytest.approx(accounting.epsilon(sigma, 0.05, 500, 1e-5))


@pytest.mark.parametrize(("kind", "head_only"), [("contrastive", False), ("mse_cosine", False),
                                               ("mse_cosine", True)])
def test_ghost_clipping_equals_clipped_per_sample_gradients(float64, kind: str,
                                                            head_only: bool) -> None:
    """Two clients' adapters with a sequence head and dropout, unequal Poisson samples: the
    clipped sums from the taped norms and the reweighted backward equal the sums of per-sample
    gradients from torch.func (each sample alone through its own client's adapter), each
    clipped to norm 0.05 over the trained parameters (all, or the head alone as in FedRep's
    first phase)."""
    config = AdapterConfig(hidden_dim=10, num_heads=2, dropout=0.3, loss=kind)
    shared, rows = federation([5, 5], sequence=True)
    torch.manual_seed(2)
    models = [AudioAdapter(AUDIO, TEXT, config, sequence_shape=SEQUENCE) for _ in range(2)]
    for model in models:
        model.set_sequence_base(shared.sequence)
    loss = AdapterLoss(config, shared.prompts, shared.label_space, shared.sequence)
    everything = [n for n, _ in models[0].named_parameters()]
    names = [n for n in everything if not (head_only and n.startswith(("norm.", "lift.")))]
    params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models])
              .requires_grad_(n in names) for n in everything}
    index = torch.stack(rows)
    sampled = torch.tensor([[1.0, 1, 0, 1, 1], [0, 1, 1, 0, 0]])
    keys = torch.arange(10).view(2, 5) * 7919 + 13
    got, _ = clipped_sums(params, names, shared.tokens[index], shared.labels[index], sampled,
                          keys, loss, config.num_heads, config.dropout, 0.05)
    for c in range(2):
        mine = {n: params[n][c : c + 1].detach() for n in names}
        frozen = {n: p[c : c + 1].detach() for n, p in params.items() if n not in names}

        def one(p: dict, tokens: torch.Tensor, label: torch.Tensor, key: torch.Tensor,
                frozen: dict = frozen) -> torch.Tensor:
            latents, sequence = adapter_outputs({**frozen, **p}, tokens.view(1, 1, *tokens.shape),
                                                config.num_heads, config.dropout, key.view(1))
            return loss.per_sample(latents.mean(2), label.view(1, 1), sequence).sum()

        per = vmap(grad(one), in_dims=(None, 0, 0, 0))(mine, shared.tokens[index[c]],
                                                        shared.labels[index[c]], keys[c])
        norms = torch.stack([per[n].flatten(1).norm(dim=1) for n in names]).norm(dim=0)
        scale = (0.05 / (norms + 1e-6)).clamp(max=1.0) * sampled[c]
        assert (norms > 0.05).any()  # clipping bites
        for name, ours in zip(names, got, strict=True):
            want = torch.einsum("b,b...->...", scale, per[name])
            torch.testing.assert_close(ours[c], want.view_as(ours[c]), rtol=1e-9, atol=1e-12,
                                       msg=name)


@pytest.mark.parametrize("head_only", [False, True])
def test_without_noise_or_clipping_dp_sgd_is_the_strategies_full_batch_step(
        float64, head_only: bool) -> None:
    """Every row sampled (rate 1), no noise, a clip no gradient reaches: DP-SGD with FedProx's
    proximal term, a SCAFFOLD/FedDyn linear term, FedGen's batches, the mean gradient and (as
    FedRep's head phase) a trainable subset is the non-private executor's full-batch training
    with the same terms, step for step."""
    config = AdapterConfig(hidden_dim=10, num_heads=2, dropout=0.0, batch_size=64, lr=0.01,
                           grad_clip=0.0)
    shared, rows = federation([5, 13, 32])
    torch.manual_seed(1)
    model = AudioAdapter(AUDIO, TEXT, config)
    loss = AdapterLoss(config, shared.prompts, shared.label_space)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    jobs = [strategy_terms(AdapterJob(i, r, start, None, training_seed(0, 1, i), f"node {i}",
                                      mu=0.1 * i), 3, i) for i, r in enumerate(rows)]
    trainable = ({n for n, _ in model.named_parameters() if not n.startswith(("norm.", "lift."))}
                 if head_only else None)
    spec = RoundSpec(config, 3, start, trainable=trainable, gradient_mean=True,
                     synthetic_weight=0.5)
    plain = list(Batched(shared, loss, model, 8).train_adapters(jobs, spec))
    private = list(Batched(shared, loss, model, 8).train_adapters(
        jobs, replace(spec, privacy=PrivacySpec(max_grad_norm=1e9, noise_multiplier=0.0))))
    for a, b in zip(plain, private, strict=True):
        for name in a.state:
            torch.testing.assert_close(b.state[name], a.state[name], rtol=1e-9, atol=1e-12)
        assert a.gradient_mean is not None and b.gradient_mean is not None
        for name in a.gradient_mean:
            torch.testing.assert_close(b.gradient_mean[name], a.gradient_mean[name],
                                       rtol=1e-9, atol=1e-12)
    assert not torch.equal(plain[2].state["attend.out_weight"], start["attend.out_weight"])


def test_sequential_and_batched_dp_sgd_agree(float64) -> None:
    """Four unequal clients, dropout, two epochs: each client's Poisson samples and noise are
    its own, so one at a time and stacked give the same adapters to rounding."""
    config = AdapterConfig(hidden_dim=10, num_heads=2, dropout=0.3, batch_size=8, lr=0.01)
    shared, rows = federation([5, 13, 32, 21])
    torch.manual_seed(1)
    model = AudioAdapter(AUDIO, TEXT, config)
    loss = AdapterLoss(config, shared.prompts, shared.label_space)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    jobs = [AdapterJob(i, r, start, None, training_seed(0, 1, i), f"node {i}")
            for i, r in enumerate(rows)]
    spec = RoundSpec(config, 2, privacy=PrivacySpec(max_grad_norm=1.0, noise_multiplier=0.5))
    alone = list(Sequential(shared, loss, model).train_adapters(jobs, spec))
    stacked = list(Batched(shared, loss, model, 64).train_adapters(jobs, spec))
    for a, b in zip(alone, stacked, strict=True):
        assert b.loss == pytest.approx(a.loss, rel=1e-9)
        for name in a.state:
            torch.testing.assert_close(b.state[name], a.state[name], rtol=1e-9, atol=1e-12)
            assert not torch.equal(a.state[name], start[name]) or name == "attend.query_bias"


def test_a_dp_run_spends_within_its_target_and_resumes_exactly(
        run_config: Callable[..., dict], monkeypatch: pytest.MonkeyPatch) -> None:
    """``privacy=dp privacy.target_epsilon=4``: every node's epsilon is logged each round and
    ends at most 4 (and near it: the noise is the smallest that meets the target); a run
    stopped by Ctrl-C in round 2 and resumed ends exactly where the straight one does, and
    one resumed with more rounds than its noise was planned for is refused."""
    args = (*QUICK, "generator=none", "privacy=dp", "privacy.target_epsilon=4",
            "federation.rounds=2", "federation.local_epochs=1", "checkpoint.every=1")
    straight = run_config(*args, folder="straight")
    final = straight["final"]
    nodes = [k for k in final if k.startswith("privacy/epsilon/node")]
    assert len(nodes) == final["partition/num_nodes"]
    assert 3.9 <= final["privacy/epsilon"] <= 4.0
    assert all(final[k] <= 4.0 for k in nodes)
    first = straight["rounds"][1]["privacy/epsilon"]
    assert 0 < first < final["privacy/epsilon"]  # spent round by round
    with monkeypatch.context() as patch:
        interrupt_in_round(patch, 2)
        with pytest.raises(RunInterrupted):
            run_config(*args, folder="resumed")
    resumed = run_config(*args, "resume=true", folder="resumed")
    assert resumed["final"] == final
    with pytest.raises(ConfigError, match=r"privacy.target_epsilon=4: node \d would spend"):
        run_config(*args[:-3], "federation.rounds=4", "federation.local_epochs=1",
                   "checkpoint.every=1", "resume=true", folder="resumed")


@pytest.mark.parametrize("aggregation", [
    "fedrep", "ditto", *(pytest.param(a, marks=pytest.mark.slow)
                         for a in ("fedprox", "scaffold", "feddyn", "fedgen"))])
def test_every_aggregation_trains_privately_and_spends_what_it_steps(
        run_config: Callable[..., dict], monkeypatch: pytest.MonkeyPatch,
        aggregation: str) -> None:
    """``privacy=dp`` with each algorithm's local terms: every Poisson-sampled step a node
    takes is counted as it is drawn (FedRep's head and body phases, Ditto's global and
    personal adapters), and the epsilon each node reports is the accountant's for exactly
    those steps at its sampling rate, within the target."""
    steps: dict[int, int] = {}
    rates: dict[int, float] = {}
    draw = training.Clients.draw

    def counting(self: training.Clients, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        for job, rate, on in zip(self.jobs, self.rates, self.active(slot), strict=True):
            steps[job.node] = steps.get(job.node, 0) + on
            rates[job.node] = rate
        return draw(self, slot)

    monkeypatch.setattr(training.Clients, "draw", counting)
    final = run_config(*ADAPTERS_ONLY, "privacy=dp", "privacy.target_epsilon=4",
                       "federation.rounds=2", "checkpoint.every=0",
                       f"federation.aggregation={aggregation}")["final"]
    sigma = final["privacy/noise_multiplier"]
    for node, taken in steps.items():
        delta = 0.1 * rates[node] / 32  # a tenth of 1 / its clips, at adapter.batch_size=32
        assert final[f"privacy/epsilon/node{node}"] == pytest.approx(
            accounting.epsilon(sigma, rates[node], taken, delta), rel=1e-6)
    assert 3.9 <= final["privacy/epsilon"] <= 4.0


def test_a_plan_beyond_the_target_stops_before_training(run_config: Callable,
                                                        tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"privacy.target_epsilon=1: node \d would spend"):
        run_config(*QUICK, "generator=none", "privacy=dp", "privacy.target_epsilon=1",
                   "privacy.noise_multiplier=0.3")
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))


@pytest.mark.parametrize(("overrides", "message"), [
    (("privacy=dp", "generator.decoder_variance=optimal"),
     "generator.decoder_variance=optimal: sets each minibatch's variance"),
    (("privacy=dp", "generator.model=gaussian"), "generator.model=gaussian: is fitted in"),
    (("privacy=dp", "generator=unified", "generator.conditional=false"),
     "generator.conditional=False: labels the draws"),
    (("privacy=dp", "generator.likelihood=mse"), "generator.sample_noise=True: draws the noise"),
    (("privacy=dp", "generator.precision=bf16"), "generator.precision=bf16: must be fp32"),
    (("privacy=dp", "privacy.generator_max_grad_norm=0"),
     "privacy.generator_max_grad_norm=0.0: must be > 0"),
    (("privacy=dp", "generator=none", "federation.algorithm=local"),
     "federation.algorithm=local: shares nothing between nodes"),
    (("privacy=dp", "generator=none", "privacy.target_epsilon=null"),
     "privacy.noise_multiplier=None: set it or privacy.target_epsilon"),
    (("privacy.max_grad_norm=0",), "privacy.max_grad_norm=0.0: must be > 0")])
def test_bad_privacy_settings_are_one_line(make_config: Callable, overrides: tuple,
                                           message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(make_config(*overrides))
