"""SCAFFOLD, FedDyn, FedPer, FedRep, Ditto and FedGen: each update rule against numbers worked
out by hand on a one-weight model, the client-side terms against AdamW's first step (which
moves every weight by the learning rate against the sign of its gradient), and whole runs on
the bundled data: sequential equals batched, and personal adapters beat the global one on
their own nodes' clips."""

import math
from collections.abc import Callable
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from conftest import ADAPTERS_ONLY
from flcore.clients.protocol import (
    AdapterJob,
    LocalUpdate,
    RoundSpec,
    SharedTensors,
    SyntheticBatches,
)
from flcore.config import AdapterConfig, Config, validate
from flcore.executors.batched import Batched
from flcore.executors.sequential import Sequential
from flcore.servers.drift import FedDyn, Scaffold
from flcore.servers.fedgen import diversity_loss
from flcore.servers.personal import Ditto, FedPer, FedRep
from flcore.trainmodel.adapters import AdapterLoss, AudioAdapter, is_body

BASELINES = ["scaffold", "feddyn", "fedper", "fedrep", "ditto", "fedgen"]


def w(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([value], dtype=torch.float64)}


def node(i: int) -> SimpleNamespace:
    return SimpleNamespace(node=i, model_state=None)


def job(i: int, start: dict[str, torch.Tensor]) -> AdapterJob:
    return AdapterJob(i, torch.arange(4), start, None, 7 + i, f"node {i}")


def update(i: int, state: dict, gradient: dict | None = None) -> LocalUpdate:
    return LocalUpdate(i, state, 4, 0.0, None, gradient)


@pytest.fixture
def config(make_config: Callable) -> Callable[..., Config]:
    return lambda *overrides: validate(make_config("generator=none", *overrides))


def test_scaffold_by_hand(config) -> None:
    """Karimireddy et al. 2020, option II with a global step of 1, N = 3 nodes."""
    scaffold = Scaffold(config("federation.aggregation=scaffold"), num_nodes=3)
    x = w(0.0)
    scaffold.begin_round()
    for i in (0, 1):  # c = c_i = 0: no correction yet
        (first,) = scaffold.jobs(node(i), job(i, x), x, 1)
        assert first.linear["w"].item() == 0
    # Node 0 ends at 1 with mean gradient 2, node 1 at 3 with mean gradient -1.
    scaffold.accept(node(0), update(0, w(1.0), w(2.0)))
    scaffold.accept(node(1), update(1, w(3.0), w(-1.0)))
    x = scaffold.conclude(x)
    assert x["w"].item() == 2.0  # (1 + 3) / 2
    # c = 0 + ((2 - 0) + (-1 - 0)) / 3 = 1/3; c_0 = 2, c_1 = -1, c_2 = 0
    expected = {0: 1 / 3 - 2, 1: 1 / 3 + 1, 2: 1 / 3}
    scaffold.begin_round()
    for i, correction in expected.items():
        (second,) = scaffold.jobs(node(i), job(i, x), x, 2)
        assert second.linear["w"].item() == pytest.approx(correction)
    # Only node 0 trains: mean gradient 5, so c moves by (5 - 2) / 3 = 1 to 4/3.
    scaffold.accept(node(0), update(0, w(1.5), w(5.0)))
    x = scaffold.conclude(x)
    assert x["w"].item() == 1.5
    (third,) = scaffold.jobs(node(2), job(2, x), x, 3)
    assert third.linear["w"].item() == pytest.approx(4 / 3)
    (third,) = scaffold.jobs(node(0), job(0, x), x, 3)
    assert third.linear["w"].item() == pytest.approx(4 / 3 - 5)


def test_feddyn_by_hand(config) -> None:
    """Acar et al. 2021, Algorithm 1 with alpha = 0.1 and N = 2 nodes."""
    feddyn = FedDyn(config("federation.aggregation=feddyn", "federation.feddyn_alpha=0.1"),
                    num_nodes=2)
    server = w(1.0)
    feddyn.begin_round()
    assert feddyn.anchor(server) is server
    (first,) = feddyn.jobs(node(0), job(0, server), server, 1)
    assert first.mu == 0.1 and first.linear["w"].item() == 0
    # The nodes end at 2 and 4 (moved 1 and 3): g_0 = -0.1, g_1 = -0.3;
    # h = 0 - 0.1 / 2 * (1 + 3) = -0.2; w = (2 + 4) / 2 - h / 0.1 = 5.
    feddyn.accept(node(0), update(0, w(2.0)))
    feddyn.accept(node(1), update(1, w(4.0)))
    server = feddyn.conclude(server)
    assert server["w"].item() == pytest.approx(5.0)
    feddyn.begin_round()
    feddyn.anchor(server)
    linear = [feddyn.jobs(node(i), job(i, server), server, 2)[0].linear["w"].item()
              for i in (0, 1)]
    assert linear == pytest.approx([0.1, 0.3])  # -g_i
    # Node 1 alone moves from 5 to 4: g_1 = -0.3 + 0.1 = -0.2; h = -0.2 + 0.05 = -0.15;
    # w = 4 + 1.5 = 5.5.
    feddyn.accept(node(1), update(1, w(4.0)))
    server = feddyn.conclude(server)
    assert server["w"].item() == pytest.approx(5.5)
    assert feddyn.jobs(node(1), job(1, server), server, 3)[0].linear["w"].item() == \
        pytest.approx(0.2)


def two_part(body: float, head: float) -> dict[str, torch.Tensor]:
    return {"lift.weight": torch.tensor([body]), "attend.out_weight": torch.tensor([head])}


def test_fedper_shares_the_body_and_keeps_each_head(config) -> None:
    fedper = FedPer(config("federation.aggregation=fedper", "federation.aggregation=fedper"))
    clients = [node(0), node(1)]
    for c in clients:
        c.model_state = two_part(0.0, 0.0)
    fedper.begin_round()
    for c, (body, head) in zip(clients, [(1.0, 10.0), (3.0, 30.0)], strict=True):
        assert fedper.start(c, two_part(0.0, 0.0)) == two_part(0.0, 0.0)
        fedper.accept(c, LocalUpdate(c.node, two_part(body, head), 1, 0.0))
    new = fedper.conclude(two_part(0.0, 0.0))
    assert new == two_part(2.0, 20.0)  # equal sizes: the plain mean of both parts
    # Each node goes on from the new body and its own head.
    assert fedper.personal_state(clients[0], new) == two_part(2.0, 10.0)
    assert fedper.start(clients[1], new) == two_part(2.0, 30.0)


def test_fedrep_trains_the_head_then_the_body(config) -> None:
    fedrep = FedRep(config("federation.aggregation=fedrep", "federation.fedrep_head_epochs=5",
                           "federation.local_epochs=1"))
    spec = RoundSpec(AdapterConfig(), epochs=1)
    head, body = fedrep.phases(spec, two_part(0.0, 0.0))
    assert (head.epochs, head.trainable) == (5, frozenset({"attend.out_weight"}))
    assert (body.epochs, body.trainable) == (1, frozenset({"lift.weight"}))


def test_ditto_trains_a_personal_adapter_towards_the_global_one(config) -> None:
    ditto = Ditto(config("federation.aggregation=ditto", "federation.ditto_lambda=0.5"))
    client = node(3)
    client.model_state = w(7.0)
    server = w(1.0)
    assert ditto.anchor(server) is server
    shared, personal = ditto.jobs(client, job(3, server), server, round_=2)
    assert (shared.start, shared.mu, shared.personal) == (server, 0.0, False)
    assert personal.start == w(7.0) and personal.mu == 0.5 and personal.personal
    assert personal.seed != shared.seed  # its own minibatches and dropout masks
    ditto.begin_round()
    ditto.accept(client, update(3, w(2.0)))
    ditto.accept_personal(client, update(3, w(6.0)))
    assert ditto.conclude(server) == w(2.0)  # the personal adapter is not averaged
    assert ditto.personal_state(client, server) == w(6.0)


def test_fedgen_diversity_term_by_hand() -> None:
    """Two draws: noises [0, 0] and [1, 1] (mean squared difference 1), features [0, 0, 0]
    and [3, 0, 0] (mean absolute difference 1); over the 2 x 2 pairs the products average
    0.5, so the term is exp(-0.5)."""
    noise = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    features = torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    assert diversity_loss(noise, features).item() == pytest.approx(math.exp(-0.5))


# --- The client-side terms, through both executors, against AdamW's first step. -------------

AUDIO, TEXT, CLASSES, HIDDEN = 6, 8, 3, 10


def one_step_setup() -> tuple[SharedTensors, AdapterLoss, AudioAdapter, AdapterConfig]:
    """One minibatch of 6 clips, no dropout, clipping or weight decay: one AdamW step then
    moves each weight by ``lr * g / (|g| + 1e-8)``, i.e. by ``lr`` against its gradient's sign
    wherever ``|g|`` is far above 1e-8."""
    g = torch.Generator().manual_seed(0)
    shared = SharedTensors(torch.randn(6, 3, AUDIO, generator=g), torch.arange(6) % CLASSES,
                           torch.randn(CLASSES, TEXT, generator=g), torch.arange(CLASSES),
                           [f"c{i}" for i in range(CLASSES)])
    config = AdapterConfig(hidden_dim=HIDDEN, num_heads=2, dropout=0.0, batch_size=6, lr=0.01,
                           grad_clip=0.0, weight_decay=0.0)
    torch.manual_seed(0)
    model = AudioAdapter(AUDIO, TEXT, config)
    return shared, AdapterLoss(config, shared.prompts, shared.label_space), model, config


EXECUTORS = {"sequential": lambda s, loss, m: Sequential(s, loss, m),
             "batched": lambda s, loss, m: Batched(s, loss, m, 8)}


@pytest.mark.parametrize("executor", EXECUTORS)
def test_a_dominant_linear_term_steps_every_weight_by_the_rate(float64, executor: str) -> None:
    """SCAFFOLD's and FedDyn's ``<w, L>`` adds ``L`` to every gradient: with ``L = +-1000`` the
    first step moves each weight by ``-+lr``; the mean gradient reported is the plain loss's
    gradient at the start, computed here by autograd on the module (in float64, as taking
    ``L`` back out of the sum costs float32 digits at this scale)."""
    shared, loss, model, config = one_step_setup()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    signs = {k: torch.where(torch.arange(v.numel()).view(v.shape) % 2 == 0, 1.0, -1.0)
             for k, v in start.items()}
    linear = {k: 1000 * s for k, s in signs.items()}
    job = AdapterJob(0, torch.arange(6), start, None, 3, "node 0", linear=linear)
    spec = RoundSpec(config, 1, gradient_mean=True)
    (got,) = EXECUTORS[executor](shared, loss, model).train_adapters([job], spec)
    model.load_state_dict(start)
    model.train()
    model.zero_grad(set_to_none=True)
    plain = loss(model.embed(shared.tokens), shared.labels)
    plain.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(got.state[name], start[name] - config.lr * signs[name],
                                   rtol=0, atol=1e-7)
        torch.testing.assert_close(got.gradient_mean[name], p.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_a_strong_proximal_term_pulls_every_weight_to_its_anchor(executor: str) -> None:
    """FedProx's, FedDyn's and Ditto's ``mu/2 ||w - anchor||^2``, weighted per job: with the
    anchor one above the start and ``mu = 1e6`` every weight steps up by ``lr``; a job with
    ``mu = 0`` beside it does not feel the anchor."""
    shared, loss, model, config = one_step_setup()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    anchor = {k: v + 1 for k, v in start.items()}
    pulled = AdapterJob(0, torch.arange(6), start, None, 3, "node 0", mu=1e6)
    free = AdapterJob(1, torch.arange(6), start, None, 3, "node 1")
    got = list(EXECUTORS[executor](shared, loss, model).train_adapters(
        [pulled, free], RoundSpec(config, 1, anchor=anchor)))
    for name, value in start.items():
        torch.testing.assert_close(got[0].state[name], value + config.lr, rtol=0, atol=1e-7)
        assert (got[1].state[name] - value).abs().max() <= config.lr * (1 + 1e-6)
        assert not torch.equal(got[1].state[name] - value,
                               torch.full_like(value, config.lr)), name


@pytest.mark.parametrize("executor", EXECUTORS)
def test_fedgen_batches_reach_the_head_only(executor: str) -> None:
    """FedGen's term is the head's loss on generated lifted tokens: it leaves the body's first
    step as it was (AdamW's step follows the gradient's sign, which the term cannot change
    where it adds nothing) and changes the head's."""
    shared, loss, model, config = one_step_setup()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    batches = SyntheticBatches(torch.randn(1, 4, 2, HIDDEN, generator=g) * 3,
                               torch.tensor([[0, 1, 2, 0]]))
    plain = AdapterJob(0, torch.arange(6), start, None, 3, "node 0")
    regularised = AdapterJob(0, torch.arange(6), start, None, 3, "node 0", synthetic=batches)
    run = EXECUTORS[executor](shared, loss, model)
    (a,) = run.train_adapters([plain], RoundSpec(config, 1, synthetic_weight=100.0))
    (b,) = run.train_adapters([regularised], RoundSpec(config, 1, synthetic_weight=100.0))
    for name in start:
        if is_body(name):
            assert torch.equal(a.state[name], b.state[name]), name
    assert not torch.equal(a.state["attend.out_weight"], b.state["attend.out_weight"])


# --- Whole runs on the bundled data. -------------------------------------------------------

BASE = (*ADAPTERS_ONLY, "adapter.lr=0.003", "server.adapter_training=fedavg")


@pytest.fixture
def run(run_config: Callable[..., dict]) -> Callable[..., dict]:
    return partial(run_config, *BASE)


def close_states(got: dict, want: dict) -> None:
    """Each tensor within 1% of its norm: in float32 AdamW lets a weight whose gradient is near
    zero step either way on a rounding difference, so single entries may differ by a few steps
    after two rounds (the executors' float64 tests hold the same terms to rounding)."""
    for name, value in want.items():
        assert (got[name] - value).norm() <= 1e-2 * value.norm() + 1e-6, name


@pytest.mark.parametrize("rule", BASELINES)
def test_sequential_and_batched_runs_agree(run, tmp_path, rule: str) -> None:
    """Two rounds (FedGen's generator regularises the second) give the same adapters, global
    and personal, and the same scores under both executors."""
    runs = {e: run(f"federation.aggregation={rule}", "federation.rounds=2",
                   f"executor={e}", folder=e) for e in ("sequential", "batched")}
    states = {e: torch.load(tmp_path / e / "checkpoints" / "round_0002.pt",
                            weights_only=True)["server"] for e in runs}
    close_states(states["batched"]["global"], states["sequential"]["global"])
    for key, value in runs["sequential"]["final"].items():
        # One clip of a node's 16 test clips may fall either side of a tie.
        tolerance = 1 / 16 + 1e-9 if key.startswith(("node", "local")) else 0.01
        assert runs["batched"]["final"][key] == pytest.approx(value, abs=tolerance), key
    if "clients" in states["sequential"]:
        for i, saved in states["sequential"]["clients"].items():
            close_states(states["batched"]["clients"][i]["model"], saved["model"])


@pytest.mark.parametrize("rule", BASELINES)
def test_resume_is_exact(run, rule: str) -> None:
    """With the strategies' node states (control variates, gradient estimates, personal
    adapters, the FedGen generator) in the checkpoint, a resumed run ends exactly where the
    uninterrupted one does."""
    aggregation = f"federation.aggregation={rule}"
    straight = run("federation.rounds=3", aggregation, folder="straight")
    run("federation.rounds=1", aggregation, folder="resumed")
    resumed = run("federation.rounds=3", aggregation, "resume=true", folder="resumed")
    assert resumed["final"] == straight["final"]


def test_personal_adapters_beat_the_global_one_on_their_own_clips(run) -> None:
    """Each node holds two of the ten classes: an adapter of its own should serve its clips
    better than FedAvg's global adapter does (``local/acc_mean`` at equal rounds), and every
    node is scored."""
    fedavg = run("federation.rounds=3", folder="fedavg")["final"]
    for rule in ("fedper", "fedrep", "ditto"):
        final = run("federation.rounds=3", f"federation.aggregation={rule}", folder=rule)["final"]
        nodes = [k for k in final if k.startswith("node") and k.endswith("/acc")]
        assert len(nodes) == final["partition/num_nodes"], rule
        assert final["local/acc_mean"] > fedavg["local/acc_mean"], (rule, final, fedavg)


def test_baselines_refuse_the_servers_synthetic_training(make_config: Callable) -> None:
    from flcore.errors import ConfigError

    with pytest.raises(ConfigError,
                       match=r"federation.aggregation.*server.adapter_training=fedavg"):
        validate(make_config("federation.aggregation=scaffold",
                             "server.adapter_training=fedavg+synthetic"))
