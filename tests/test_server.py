"""The A2V server's round on a hand-built federation: what ``train_round`` makes of the clients'
adapters (FedAvg weights, FedProx, FedAdam, distillation) against computations written here,
generators that never read a val or test clip, and the rows that ``val/*`` and ``gen/*`` score.

Every federation here is built from random tensors, so node sizes are exact and a round takes
milliseconds. Reference states are computed by training copies of the adapter with the same
``client.train`` call (same seeds, dropout off), then combined by hand.
"""

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from flcore.clients.clientA2V import ClientA2V
from flcore.clients.protocol import SharedTensors
from flcore.config import Config, validate
from flcore.errors import CheckpointError
from flcore.servers.aggregation import FedAvgM, FedYogi, server_optimizer
from flcore.servers.serverA2V import ServerA2V
from flcore.servers.strategies import FedAvg
from flcore.tracking import Trackers
from flcore.trainmodel.adapters import AdapterLoss, AudioAdapter

NAMES = ["a", "b", "c"]
TOKENS, AUDIO_DIM, TEXT_DIM = 4, 8, 16
# Node i holds two classes and TRAIN[i] training clips (unequal on purpose), plus 2 val and 4
# test clips.
HOLDS = [["a", "b"], ["b", "c"], ["a", "c"]]
TRAIN = [8, 24, 56]
# The sequential executor, so that the hand-computed client updates below come from the same
# arithmetic (tests/test_executors.py checks the batched executor against it).
BASE = ("logger=none", "audio_encoder=mfcc", "generator=none", "server.adapter_training=fedavg",
        "adapter.hidden_dim=32", "adapter.dropout=0", "adapter.batch_size=16",
        "adapter.lr=0.01", "federation.local_epochs=2", "federation.rounds=4",
        "executor=sequential")

State = dict[str, torch.Tensor]


def federation(nan_heldout: bool = False) -> tuple[SharedTensors, list[ClientA2V]]:
    """Clips whose tokens are their class's prompt (first AUDIO_DIM dims) plus noise; with
    ``nan_heldout`` every val and test clip's tokens are NaN."""
    gen = torch.Generator().manual_seed(0)
    prompts = F.normalize(torch.randn(len(NAMES), TEXT_DIM, generator=gen), dim=-1)
    labels, splits, heldout = [], [], []
    for classes, n_train in zip(HOLDS, TRAIN, strict=True):
        ids = [NAMES.index(c) for c in classes]
        split = {}
        for name, n in (("train", n_train), ("val", 2), ("test", 4)):
            split[name] = torch.arange(len(labels), len(labels) + n)
            labels += [ids[i % len(ids)] for i in range(n)]
            if name != "train":
                heldout.append(split[name])
        splits.append(split)
    label_tensor = torch.tensor(labels)
    tokens = (3 * prompts[label_tensor, None, :AUDIO_DIM]
              + torch.randn(len(labels), TOKENS, AUDIO_DIM, generator=gen))
    if nan_heldout:
        tokens[torch.cat(heldout)] = float("nan")
    shared = SharedTensors(tokens, label_tensor, prompts, torch.arange(len(NAMES)), NAMES)
    clients = [ClientA2V(node, classes, s["train"], s["val"], s["test"])
               for node, (classes, s) in enumerate(zip(HOLDS, splits, strict=True))]
    return shared, clients


@pytest.fixture
def build(make_config: Callable[..., DictConfig], tmp_path: Path
          ) -> Callable[..., tuple[ServerA2V, SharedTensors, list[ClientA2V]]]:
    def _build(*overrides: str, nan_heldout: bool = False
               ) -> tuple[ServerA2V, SharedTensors, list[ClientA2V]]:
        config = validate(make_config(*BASE, *overrides))
        shared, clients = federation(nan_heldout)
        server = ServerA2V(config, clients, shared, Trackers([]), tmp_path, {})
        return server, shared, clients

    return _build


def clone(state: State) -> State:
    return {k: v.detach().clone() for k, v in state.items()}


def trained_copy(config: Config, shared: SharedTensors, client: ClientA2V, start: State,
                 round_: int) -> State:
    """``client``'s local training from ``start``, on a model of our own."""
    a = config.adapter
    model = AudioAdapter(AUDIO_DIM, TEXT_DIM, a)
    model.load_state_dict(start)
    loss = AdapterLoss(a, shared.prompts, shared.label_space)
    return client.train(model, shared, loss, a, config.federation.local_epochs, round_,
                        config.seed).state


def combine(states: list[State], weights: list[float]) -> State:
    """sum_i w_i state_i / sum_i w_i, key by key."""
    return {k: sum(w * s[k] for s, w in zip(states, weights, strict=True)) / sum(weights)
            for k in states[0]}


def distance(a: State, b: State) -> float:
    """L2 distance over every parameter."""
    return sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5


def assert_states_close(actual: State, expected: State) -> None:
    assert actual.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], rtol=1e-5, atol=1e-6,
                                   msg=lambda text, k=k: f"{k}: {text}")


# Two states count as different when they are this many times farther apart than the tolerance
# of assert_states_close.
MEASURABLY = 1000 * 1e-6


def test_fedavg_weights_nodes_by_their_training_clips(build) -> None:
    server, shared, clients = build()
    start = clone(server.global_state)
    states = [trained_copy(server.config, shared, c, start, 1) for c in clients]
    server.train_round(1, clients)
    weighted = combine(states, [8.0, 24.0, 56.0])
    unweighted = combine(states, [1.0, 1.0, 1.0])
    assert_states_close(server.global_state, weighted)
    assert distance(server.global_state, unweighted) > MEASURABLY

    # Round 2 with two of the three nodes: only their counts weigh.
    start = clone(server.global_state)
    pair = [clients[0], clients[2]]
    states = [trained_copy(server.config, shared, c, start, 2) for c in pair]
    server.train_round(2, pair)
    assert_states_close(server.global_state, combine(states, [8.0, 56.0]))
    assert distance(server.global_state, combine(states, [1.0, 1.0])) > MEASURABLY


def test_mean_aggregation_gives_every_node_the_same_weight(build) -> None:
    server, shared, clients = build("federation.aggregation=mean")
    start = clone(server.global_state)
    states = [trained_copy(server.config, shared, c, start, 1) for c in clients]
    server.train_round(1, clients)
    assert_states_close(server.global_state, combine(states, [1.0, 1.0, 1.0]))
    assert distance(server.global_state, combine(states, [8.0, 24.0, 56.0])) > MEASURABLY


def test_fedprox_keeps_the_round_closer_to_the_global_model(build) -> None:
    """Same data, seeds and start: a large proximal weight keeps the aggregate nearer the
    previous global model than FedAvg's; with mu=0 FedProx is FedAvg exactly."""
    longer = ("federation.local_epochs=6",)
    ends = {}
    for name, overrides in [("fedavg", ()),
                            ("prox0", ("federation.aggregation=fedprox",
                                       "federation.fedprox_mu=0")),
                            ("prox", ("federation.aggregation=fedprox",
                                      "federation.fedprox_mu=100"))]:
        server, _, clients = build(*longer, *overrides)
        start = clone(server.global_state)
        server.train_round(1, clients)
        ends[name] = (start, clone(server.global_state))
    start = ends["fedavg"][0]
    assert all(distance(s, start) == 0 for s, _ in ends.values())
    assert_states_close(ends["prox0"][1], ends["fedavg"][1])
    fedavg_drift = distance(ends["fedavg"][1], start)
    prox_drift = distance(ends["prox"][1], start)
    assert fedavg_drift > MEASURABLY
    assert prox_drift < 0.5 * fedavg_drift, (prox_drift, fedavg_drift)


def server_step(rule: str, w: torch.Tensor, delta: torch.Tensor, moments: dict[str, torch.Tensor],
                lr: float, b1: float, b2: float, tau: float, momentum: float) -> torch.Tensor:
    """One server step of ``rule`` on one tensor, as the papers write it: FedAvgM (Hsu et al.
    2019) v = momentum v + delta, w += lr v; the FedOpt family (Reddi et al. 2021, Algorithm 2,
    v_{-1} = tau^2, no bias correction) m = b1 m + (1-b1) delta, v by Adam's, Yogi's or
    Adagrad's rule, w += lr m / (sqrt(v) + tau)."""
    if rule == "fedavgm":
        moments["v"] = momentum * moments.get("v", torch.zeros_like(w)) + delta
        return w + lr * moments["v"]
    m = b1 * moments.get("m", torch.zeros_like(w)) + (1 - b1) * delta
    v, d2 = moments.get("v", torch.full_like(w, tau**2)), delta * delta
    if rule == "fedadam":
        v = b2 * v + (1 - b2) * d2
    elif rule == "fedyogi":
        v = v - (1 - b2) * d2 * torch.sign(v - d2)
    else:
        v = v + d2
    moments["m"], moments["v"] = m, v
    return w + lr * m / (torch.sqrt(v) + tau)


@pytest.mark.parametrize("rule", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_server_optimizers_over_two_rounds_by_hand(build, rule: str) -> None:
    """From the sample-weighted average ``a`` of each round's client adapters, delta = a - w,
    and the global adapter takes the rule's step."""
    lr, b1, b2, tau, momentum = 0.05, 0.8, 0.95, 0.002, 0.7
    server, shared, clients = build(f"federation.aggregation={rule}",
                                    f"federation.server_lr={lr}",
                                    f"federation.server_betas=[{b1},{b2}]",
                                    f"federation.server_tau={tau}",
                                    f"federation.server_momentum={momentum}")
    w = clone(server.global_state)
    moments: dict[str, dict[str, torch.Tensor]] = {k: {} for k in w}
    for round_ in (1, 2):
        states = [trained_copy(server.config, shared, c, w, round_) for c in clients]
        average = combine(states, [8.0, 24.0, 56.0])
        w = {k: server_step(rule, w[k], average[k] - w[k], moments[k], lr, b1, b2, tau, momentum)
             for k in w}
        server.train_round(round_, clients)
        assert_states_close(server.global_state, w)
        assert distance(server.global_state, average) > MEASURABLY
        # Round 2's clients start from the server's weights, equal to ours up to rounding only
        # (an adaptive rule would amplify that rounding in parameters whose gradient is ~0, such
        # as the attention's key bias); the moments stay ours.
        w = clone(server.global_state)


def test_fedavgm_default_rate_is_one_minus_momentum(make_config: Callable[..., DictConfig]
                                                    ) -> None:
    """A null server_lr gives FedAvgM lr = 1 - momentum (effective rate 1) and FedOpt 0.01."""
    avgm = server_optimizer(validate(make_config("federation.aggregation=fedavgm",
                                                 "federation.server_momentum=0.8")).federation)
    assert isinstance(avgm, FedAvgM) and avgm.lr == pytest.approx(0.2) and avgm.momentum == 0.8
    yogi = server_optimizer(validate(make_config("federation.aggregation=fedyogi")).federation)
    assert isinstance(yogi, FedYogi) and yogi.lr == 0.01 and yogi.tau == 0.001
    assert server_optimizer(validate(make_config()).federation) is None


GENERATORS = ("generator=per_class", "generator.training_epochs=3", "generator.hidden_dim=32",
              "generator.latent_dim=8", "generator.batch_size=16", "generator.lr=0.01")


def kd_loss(state: State, config: Config, x: torch.Tensor, targets: torch.Tensor) -> float:
    """MSE + cosine distance between ``state``'s outputs on ``x`` and ``targets``."""
    model = AudioAdapter(AUDIO_DIM, TEXT_DIM, config.adapter)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        out = model.embed(x)
    return float(((out - targets) ** 2).mean() + 1 - F.cosine_similarity(out, targets).mean())


def outputs(state: State, config: Config, x: torch.Tensor) -> torch.Tensor:
    model = AudioAdapter(AUDIO_DIM, TEXT_DIM, config.adapter)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return model.embed(x)


def test_distillation_moves_the_global_adapter_towards_the_teachers(build) -> None:
    server, shared, clients = build(*GENERATORS, "server.adapter_training=kd")
    config = server.config
    before = clone(server.global_state)
    teachers = [trained_copy(config, shared, c, before, 1) for c in clients]
    server.train_round(1, clients)
    assert server.synthetic.pool is not None
    x, y = server.synthetic.pool
    # Each synthetic sample's target: the mean output of the teachers whose node holds its class.
    total = torch.zeros(len(x), TEXT_DIM)
    count = torch.zeros(len(x), 1)
    for client, state in zip(clients, teachers, strict=True):
        holds = torch.tensor([NAMES[int(c)] in client.classes for c in y])
        total[holds] += outputs(state, config, x[holds])
        count[holds] += 1
    assert bool((count == 2).all())  # every class is held by two nodes
    targets = total / count
    loss_before = kd_loss(before, config, x, targets)
    loss_after = kd_loss(server.global_state, config, x, targets)
    assert loss_after < loss_before, (loss_before, loss_after)
    # The change of the outputs points towards the targets, sample by sample on average.
    moved = outputs(server.global_state, config, x) - outputs(before, config, x)
    wanted = targets - outputs(before, config, x)
    assert float(F.cosine_similarity(moved, wanted).mean()) > 0


def finite(state: State) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values())


@pytest.mark.parametrize("overrides", [
    ("generator=per_class",),
    ("generator=unified", "generator.conditional=false"),
    ("generator=unified",),
    ("generator=per_class", "server.generator.granularity=per_class"),
    ("generator=unified", "server.generator.granularity=per_class"),
    ("generator=per_class", "generator.training_data=adapter_output",
     "server.adapter_training=fedavg"),
], ids=["per_class", "unified", "unified_conditional", "per_class+server_per_class",
        "unified+server_per_class", "adapter_output"])
def test_generators_never_read_val_or_test_clips(build, overrides: tuple[str, ...]) -> None:
    """Every val and test clip is NaN: a generator, centroid or synthetic sample that read one
    would be NaN (or raise a NaN-loss error). Rounds 1 and 2 of 4 run no evaluation and no
    generator scoring (which reads held-out clips on purpose)."""
    server, shared, clients = build(*GENERATORS, *overrides, "eval.generator_every=4",
                                    nan_heldout=True)
    train = torch.cat([c.train_idx for c in clients])
    assert bool(torch.isfinite(shared.tokens[train]).all())
    assert not bool(torch.isfinite(shared.tokens).all())
    for round_ in (1, 2):
        metrics = server.train_round(round_, clients)
        assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
        assert "synthetic/samples" in metrics
        assert server.synthetic.pool is not None
        x, y = server.synthetic.pool
        assert len(x) == sum(TRAIN) and bool(torch.isfinite(x).all())
        assert set(y.tolist()) <= set(range(len(NAMES)))
        assert sorted(server.synthetic.received) == [0, 1, 2]
        for node, (sx, _) in server.synthetic.received.items():
            assert bool(torch.isfinite(sx).all()), node
        for client in clients:
            assert client.generators is not None
            assert finite(client.generators.model.state_dict()), client.node
        assert finite(server.global_state)
        if server.synthetic.tstr_state is not None:
            assert finite(server.synthetic.tstr_state)
        if server.synthetic.server_bank is not None:
            assert finite(server.synthetic.server_bank.model.state_dict())
    if overrides == ("generator=unified", "generator.conditional=false"):
        # Unconditional unified generators label each draw by the nearest centroid of the
        # node's training clips (tokens are already sequence_length long, so rows are the
        # flattened tokens).
        for client in clients:
            sx, sy = server.synthetic.received[client.node]
            rows = shared.tokens[client.train_idx].reshape(len(client.train_idx), -1)
            held = shared.labels[client.train_idx]
            classes = held.unique()
            table = torch.stack([rows[held == c].mean(0) for c in classes])
            nearest = classes[torch.cdist(sx.reshape(len(sx), -1), table).argmin(1)]
            assert torch.equal(sy, nearest), client.node


def synthetic_pool_of_far_classes() -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Synthetic samples ``[m, TOKENS, AUDIO_DIM]`` of the federation's three classes as two
    nodes would send them: rows around class means about 16 apart, with noise of std 0.5."""
    gen = torch.Generator().manual_seed(5)
    means = 2 * torch.randn(len(NAMES), TOKENS * AUDIO_DIM, generator=gen)
    pool = {}
    for node, classes in ((0, [0, 1]), (1, [1, 2])):
        y = torch.tensor(classes).repeat_interleave(24)
        x = means[y] + 0.5 * torch.randn(len(y), TOKENS * AUDIO_DIM, generator=gen)
        pool[node] = (x.reshape(len(y), TOKENS, AUDIO_DIM), y)
    return pool


def test_server_generators_follow_generator_conditional(build) -> None:
    """A unified server generator is conditioned on the class prompts under
    ``generator.conditional`` (its condition is as wide as a prompt) and draws each class as
    often as it was received; unconditional, it labels its draws by the nearest centroid of the
    pooled samples. Either way the draws of class c lie nearer class c's pooled rows than any
    other class's (far-apart classes), the conditional draws the nearer (each class drawn
    directly, not carved out of one mixture); only the centroid-labelled bank reports a
    majority share."""
    within = {}
    for conditional in (True, False):
        server, _, _ = build(*GENERATORS, "generator.training_epochs=40",
                             "server.generator.granularity=unified",
                             f"generator.conditional={str(conditional).lower()}")
        server.synthetic.received = synthetic_pool_of_far_classes()
        x, y = server.synthetic.make_pool(1)
        assert server.synthetic.server_bank is not None
        assert server.synthetic.server_bank.model.cond == (TEXT_DIM if conditional else 0)
        rows = torch.cat([s[0] for s in server.synthetic.received.values()]).flatten(1)
        labels = torch.cat([s[1] for s in server.synthetic.received.values()])
        draws = x.flatten(1)
        distance = torch.stack([
            torch.stack([torch.cdist(draws[y == c], rows[labels == r]).mean()
                         for r in range(len(NAMES))]) for c in range(len(NAMES))])
        assert torch.equal(distance.argmin(1), torch.arange(len(NAMES))), distance
        within[conditional] = float(distance.diagonal().mean())
        centroids = torch.stack([rows[labels == c].mean(0) for c in range(len(NAMES))])
        nearest = torch.cdist(draws, centroids).argmin(1)
        if conditional:
            assert torch.equal(torch.bincount(y), torch.bincount(labels))
            assert (nearest == y).double().mean() >= 0.95
            assert "server" not in server.synthetic.majority_shares
        else:
            assert torch.equal(nearest, y)
            assert server.synthetic.majority_shares["server"] == pytest.approx(
                float(torch.bincount(nearest).max()) / len(nearest))
    assert within[True] < 0.75 * within[False], within


def test_the_server_reports_the_majority_share_of_its_centroid_labelled_draws(build) -> None:
    """``server/synthetic/majority_share`` of a round is the largest class share of the server
    bank's draws, each labelled by its nearest centroid of the samples the nodes sent (computed
    here from the pool alone)."""
    server, _, clients = build(*GENERATORS, "generator=unified", "generator.conditional=false",
                               "server.generator.granularity=per_group",
                               "+generator.class_groups={g:[a,b]}")
    metrics = server.train_round(1, clients)
    rows = torch.cat([s[0] for s in server.synthetic.received.values()]).flatten(1)
    labels = torch.cat([s[1] for s in server.synthetic.received.values()])
    assert server.synthetic.pool is not None
    draws, y = server.synthetic.pool[0].flatten(1), server.synthetic.pool[1]
    group = y != 2  # the group {a, b} is centroid-labelled; the group "other" holds c alone
    centroids = torch.stack([rows[labels == c].mean(0) for c in (0, 1)])
    assert torch.equal(torch.cdist(draws[group], centroids).argmin(1), y[group])
    counts = torch.bincount(y, minlength=len(NAMES))
    assert metrics["server/synthetic/majority_share"] == pytest.approx(
        float(counts.max()) / len(y))
    assert {f"node{c.node}/synthetic/majority_share" for c in clients} < metrics.keys()


def hand_accuracy(state: State, config: Config, shared: SharedTensors,
                  idx: torch.Tensor) -> float:
    """Zero-shot accuracy of ``state`` on clips ``idx``, written out: the label-space prompt of
    largest cosine with the clip's embedding is the prediction."""
    model = AudioAdapter(AUDIO_DIM, TEXT_DIM, config.adapter)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        embedded = model.embed(shared.tokens[idx])
    cosine = (F.normalize(embedded, dim=-1)
              @ F.normalize(shared.prompts[shared.label_space], dim=-1).T)
    predicted = shared.label_space[cosine.argmax(1)]
    return float((predicted == shared.labels[idx]).double().mean())


def test_val_accuracy_is_scored_on_exactly_the_nodes_val_rows(
        build, monkeypatch: pytest.MonkeyPatch) -> None:
    """``val/acc`` scores the nodes' val clips, node by node, and no other row: it equals the
    accuracy recomputed here on those rows. The val clips here sound like the next class
    (their tokens are its prompt plus noise), so on the test clips, which the adapter learned
    to recognise, the same adapter scores otherwise."""
    from flcore.servers import evaluation

    server, shared, clients = build()
    val = torch.cat([c.val_idx for c in clients])
    test = torch.cat([c.test_idx for c in clients])
    gen = torch.Generator().manual_seed(5)
    next_class = (shared.labels[val] + 1) % len(NAMES)
    shared.tokens[val] = (3 * shared.prompts[next_class, None, :AUDIO_DIM]
                          + torch.randn(len(val), TOKENS, AUDIO_DIM, generator=gen))
    for round_ in (1, 2):
        server.train_round(round_, clients)
    scored: list[torch.Tensor] = []
    original = evaluation.evaluate

    def spy(model: AudioAdapter, tensors: SharedTensors, idx: torch.Tensor) -> dict:
        scored.append(idx.clone())
        return original(model, tensors, idx)

    monkeypatch.setattr(evaluation, "evaluate", spy)
    metrics = server.evaluate_all()
    assert len(scored) == 1 and torch.equal(scored[0], val)
    on_val = hand_accuracy(server.global_state, server.config, shared, val)
    on_test = hand_accuracy(server.global_state, server.config, shared, test)
    assert on_val != on_test, (on_val, on_test)
    assert metrics["val/acc"] == pytest.approx(on_val, abs=1e-12)
    assert metrics["global/acc"] == pytest.approx(on_test, abs=1e-12)


@pytest.mark.parametrize("has_val", [True, False], ids=["val", "no_val"])
def test_generators_are_scored_on_the_nodes_val_rows_else_their_test_rows(
        build, monkeypatch: pytest.MonkeyPatch, has_val: bool) -> None:
    """``gen/*`` compares each node's synthetic samples of a class with exactly its val clips of
    that class (pooled to the generators' rows), or its test clips for a node without val
    clips; ``held_out`` names that split."""
    from flcore.servers import generator_quality
    from flcore.trainmodel.generators import generator_rows

    server, shared, clients = build(*GENERATORS, "eval.generator_every=1")
    if not has_val:
        for client in clients:
            client.val_idx = client.val_idx[:0]
    real: dict[str, torch.Tensor] = {}
    original = generator_quality.generator_report

    def spy(real_by_class: dict, *args, **kwargs) -> dict:
        real.update(real_by_class)
        return original(real_by_class, *args, **kwargs)

    monkeypatch.setattr(generator_quality, "generator_report", spy)
    server.train_round(1, clients)
    assert server.quality is not None
    split = "val" if has_val else "test"
    assert server.quality.held_out == {f"node{c.node}": split for c in clients}
    expected = {}
    for client in clients:
        rows = client.val_idx if has_val else client.test_idx
        for name in client.classes:
            mine = rows[shared.labels[rows] == NAMES.index(name)]
            expected[f"node{client.node}/{name}"] = generator_rows(
                shared.tokens[mine], server.config.generator.sequence_length)
    assert real.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(real[key], value), key


def test_training_rows_as_samples_score_the_train_rows_reference(build) -> None:
    """``gen/train_rows/*`` is what a generator that reproduces its training rows exactly
    scores: sharing those rows as samples gives the same precision, recall, density and
    coverage."""
    from flcore.servers.generator_quality import REFERENCE_METRICS, score_generators
    from flcore.trainmodel.generators import generator_rows

    server, shared, clients = build(*GENERATORS, "eval.generator_every=1")
    server.train_round(1, clients)
    length = server.config.generator.sequence_length
    copies = {c.node: (generator_rows(shared.tokens[c.train_idx], length).reshape(
        len(c.train_idx), length, -1), shared.labels[c.train_idx]) for c in clients}
    scalars = score_generators(clients, copies, shared, server.config, 1).scalars
    for metric in REFERENCE_METRICS:
        assert scalars[f"gen/{metric}"] == pytest.approx(scalars[f"gen/train_rows/{metric}"])
    assert server.quality is not None
    assert {f"gen/train_rows/{m}" for m in REFERENCE_METRICS} <= server.quality.scalars.keys()


def test_a_checkpoint_without_server_optimizer_moments_is_refused(
        make_config: Callable[..., DictConfig]) -> None:
    """FedAdam moments saved under an older key cannot resume FedYogi/FedAdam silently."""
    strategy = FedAvg(validate(make_config("federation.aggregation=fedadam")))
    with pytest.raises(CheckpointError, match="no server optimizer moments"):
        strategy.load_state_dict({"fedadam": {"m": {}, "v": {}}}, torch.device("cpu"))
    strategy.load_state_dict(strategy.state_dict(), torch.device("cpu"))
