"""The ``ray`` executor against the sequential reference on a local Ray of 2 CPUs: same updates
for jobs of unequal sizes split over tasks, the same run end to end, a worker that dies (retried,
or reported with its nodes and round), training errors passed through unchanged, GPUs asked of a
machine without any, and a cluster address where nothing answers."""

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from conftest import HANG_GUARD_S

ray = pytest.importorskip("ray")

from flcore.clients.protocol import (  # noqa: E402
    AdapterJob,
    LocalUpdate,
    RoundSpec,
    SharedTensors,
    SyntheticBatches,
)
from flcore.clients.training import build_adapter, build_adapter_loss  # noqa: E402
from flcore.config import Config, validate  # noqa: E402
from flcore.errors import ConfigError, ResourceError, TrainingError  # noqa: E402
from flcore.executors import ray as ray_executor  # noqa: E402
from flcore.executors.ray import RayExecutor, describe  # noqa: E402
from flcore.executors.sequential import Sequential  # noqa: E402
from flcore.trainmodel.adapters import AdapterLoss, AudioAdapter  # noqa: E402

CLASSES, TOKENS, AUDIO_DIM, TEXT_DIM = 3, 4, 8, 16
SEQUENCE = (3, 8)  # tokens and width of the class token sequences
SIZES = [8, 24, 5, 56, 17]  # unequal on purpose: 2 tasks of 3 and 2 clients
BASE = ("logger=none", "audio_encoder=mfcc", "generator=none", "adapter.hidden_dim=32",
        "adapter.dropout=0.1", "adapter.batch_size=16", "adapter.lr=0.01", "executor=ray",
        "executor.clients_per_batch=3")


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    """One local Ray of 2 CPUs for the module; the executors join it and leave it running."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
             object_store_memory=256 * 2**20)
    yield
    ray.shutdown()


@pytest.fixture
def config(make_config: Callable[..., DictConfig]) -> Callable[..., Config]:
    return lambda *overrides: validate(make_config(*BASE, *overrides))


def shared_tensors() -> SharedTensors:
    gen = torch.Generator().manual_seed(0)
    prompts = F.normalize(torch.randn(CLASSES, TEXT_DIM, generator=gen), dim=-1)
    labels = torch.arange(sum(SIZES)) % CLASSES
    tokens = (3 * prompts[labels, None, :AUDIO_DIM]
              + torch.randn(len(labels), TOKENS, AUDIO_DIM, generator=gen))
    sequence = torch.randn(CLASSES, *SEQUENCE, generator=gen)
    return SharedTensors(tokens, labels, prompts, torch.arange(CLASSES),
                         [f"class{c}" for c in range(CLASSES)], sequence)


def parts(config: Config, shared: SharedTensors) -> tuple[AdapterLoss, AudioAdapter]:
    """Loss and adapter, with a sequence head: its targets travel to the workers too."""
    torch.manual_seed(0)
    return build_adapter_loss(shared, config.adapter), build_adapter(shared, config.adapter)


def make_jobs(model: AudioAdapter, round_: int, optimizer_states: list | None = None,
              starts: list | None = None, mu: float = 0.0) -> list[AdapterJob]:
    """One job per node; by default all start from ``model`` (one shared state) without
    optimizer state."""
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    offsets = torch.tensor([0, *SIZES]).cumsum(0).tolist()
    states = optimizer_states or [None] * len(SIZES)
    return [AdapterJob(node, torch.arange(offsets[node], offsets[node + 1]),
                       starts[node] if starts else start, states[node], 1000 * round_ + node,
                       f"node {node}, round {round_}", mu=mu)
            for node in range(len(SIZES))]


def outputs(config: Config, shared: SharedTensors, state: dict) -> torch.Tensor:
    """Pooled and sequence outputs of ``state`` on every clip, side by side."""
    model = build_adapter(shared, config.adapter)
    model.load_state_dict(state)
    with torch.no_grad():
        pooled, sequence = model.eval().outputs(shared.tokens)
    return torch.cat([pooled, sequence.flatten(1)], 1)


def assert_same(config: Config, shared: SharedTensors, got: list[LocalUpdate],
                want: list[LocalUpdate]) -> None:
    assert [u.node for u in got] == [u.node for u in want]
    for g, w in zip(got, want, strict=True):
        assert g.num_samples == w.num_samples
        assert abs(g.loss - w.loss) < 1e-4, (g.node, g.loss, w.loss)
        diff = (outputs(config, shared, g.state) - outputs(config, shared, w.state)).abs().max()
        assert diff < 1e-4, (g.node, float(diff))
        assert all(v.device.type == "cpu" for v in g.state.values())
        assert (g.optimizer_state is None) == (w.optimizer_state is None)
        if w.optimizer_state is not None:
            for i, entry in w.optimizer_state["state"].items():
                mine = g.optimizer_state["state"][i]
                assert float(mine["step"]) == float(entry["step"])
                torch.testing.assert_close(mine["exp_avg"], entry["exp_avg"], rtol=1e-3,
                                           atol=1e-6)


def test_tasks_match_the_sequential_executor(config) -> None:
    """Two rounds of 5 unequal clients over 2 tasks, with dropout, FedProx and kept AdamW
    state: in the second, each client starts from its own first-round state and optimizer
    state (one has none yet). The updates equal Sequential's."""
    cfg = config()
    shared = shared_tensors()
    loss, model = parts(cfg, shared)
    executor = RayExecutor(cfg, shared, loss, model)
    reference = Sequential(shared, loss, parts(cfg, shared)[1])
    anchor = {k: v.clone() for k, v in model.state_dict().items()}
    spec = RoundSpec(cfg.adapter, epochs=2, anchor=anchor, keep_optimizer=True)
    try:
        first = list(executor.train_adapters(make_jobs(model, 1, mu=0.01), spec))
        want = list(reference.train_adapters(make_jobs(model, 1, mu=0.01), spec))
        assert_same(cfg, shared, first, want)
        carried = [u.optimizer_state for u in want]
        carried[3] = None
        starts = [u.state for u in want]
        second = list(executor.train_adapters(make_jobs(model, 2, carried, starts, 0.01), spec))
        want = list(reference.train_adapters(make_jobs(model, 2, carried, starts, 0.01), spec))
        assert_same(cfg, shared, second, want)
    finally:
        executor.close()
    assert ray.is_initialized(), "close() must leave a Ray it did not start running"


def test_a_run_on_ray_equals_a_sequential_run(run_config: Callable[..., dict]) -> None:
    fast = ("logger=[csv]", "audio_encoder=mfcc", "generator=none", "federation.rounds=2",
            "federation.local_epochs=1", "adapter.hidden_dim=32", "checkpoint.every=0")
    on_ray = run_config(*fast, "executor=ray", "executor.clients_per_batch=2", folder="ray")
    reference = run_config(*fast, "executor=sequential", folder="sequential")
    assert on_ray["status"] == reference["status"] == "completed"
    got, want = on_ray["final"], reference["final"]
    assert got.keys() == want.keys()
    for key, value in want.items():
        if "acc" in key:
            assert got[key] == value, key
        else:
            assert got[key] == pytest.approx(value, abs=1e-4), key


def test_a_training_error_reaches_the_user_unchanged(config) -> None:
    """A diverged client raises the same TrainingError as in the sequential executor (an
    application error: Ray does not retry it, whatever executor.max_retries)."""
    cfg = config("executor.max_retries=3")
    shared = shared_tensors()
    loss, model = parts(cfg, shared)
    with torch.no_grad():
        model.lift.weight.fill_(float("nan"))
    jobs = make_jobs(model, 4)
    spec = RoundSpec(cfg.adapter, epochs=1)
    with pytest.raises(TrainingError) as want:
        list(Sequential(shared, loss, parts(cfg, shared)[1]).train_adapters(jobs, spec))
    executor = RayExecutor(cfg, shared, loss, model)
    try:
        with pytest.raises(TrainingError) as got:
            list(executor.train_adapters(jobs, spec))
    finally:
        executor.close()
    assert type(got.value) is TrainingError
    assert str(got.value) == str(want.value)


@pytest.mark.parametrize("address", ["null", "auto"])
def test_gpus_asked_of_a_machine_without_any(config, address: str) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = config("executor.num_gpus=0.5", f"executor.address={address}")
    shared = shared_tensors()
    with pytest.raises(ResourceError, match=r"^executor\.num_gpus=0\.5: .*executor\.num_gpus=0"):
        RayExecutor(cfg, shared, *parts(cfg, shared))


def test_a_task_is_named_by_its_nodes_and_round() -> None:
    job = AdapterJob(3, torch.arange(2), {}, None, 0, "node 3, round 2")
    assert describe([job]) == "node 3, round 2"
    assert describe([job, AdapterJob(5, torch.arange(2), {}, None, 0, "node 5, round 2")]
                    ) == "nodes 3, 5, round 2"


@pytest.mark.parametrize("address", ["nowhere", "host:port", "10.0.0.1"])
def test_a_malformed_address_is_a_config_error(config, address: str) -> None:
    with pytest.raises(ConfigError, match=f"^executor.address={address}: must be null"):
        config(f"executor.address={address}")


UNREACHABLE = textwrap.dedent("""
    import os, socket, sys, time
    import torch
    from omegaconf import OmegaConf
    from flcore.clients.protocol import SharedTensors
    from flcore.config import Config
    from flcore.errors import ResourceError
    from flcore.executors.ray import RayExecutor
    from flcore.trainmodel.adapters import AdapterLoss, AudioAdapter

    config = OmegaConf.to_object(OmegaConf.structured(Config))
    config.executor.name, config.executor.connect_timeout_s = "ray", 2
    shared = SharedTensors(torch.zeros(2, 1, 4), torch.zeros(2, dtype=torch.long),
                           torch.ones(1, 4), torch.arange(1), ["a"])
    model = AudioAdapter(4, 4, config.adapter)
    loss = AdapterLoss(config.adapter, shared.prompts, shared.label_space)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepts connections, never speaks Ray
    for address in (f"127.0.0.1:{port}", f"127.0.0.1:{silent.getsockname()[1]}"):
        config.executor.address = address
        tic = time.monotonic()
        try:
            RayExecutor(config, shared, loss, model)
            print("connected?!")
        except ResourceError as err:
            print(f"{time.monotonic() - tic:.1f}|{err}")
    sys.stdout.flush()
    os._exit(0)  # the abandoned ray.init thread may still be retrying
""")


def test_an_unreachable_address_fails_fast_with_one_line(tmp_path: Path) -> None:
    """Run apart from this module's Ray: an executor joins a Ray its process already holds."""
    out = subprocess.run([sys.executable, "-c", UNREACHABLE], capture_output=True, text=True,
                         timeout=HANG_GUARD_S, check=False, cwd=tmp_path)
    lines = [line.split("|", 1) for line in out.stdout.splitlines() if "|" in line]
    assert len(lines) == 2, out.stdout + out.stderr
    (refused_s, refused), (silent_s, silent) = lines
    assert float(refused_s) < 2 and refused.startswith("executor.address=127.0.0.1:")
    assert "no Ray cluster answers there" in refused and "executor.address=null" in refused
    assert 1.5 < float(silent_s) < HANG_GUARD_S
    assert "within executor.connect_timeout_s=2 s" in silent


def crash_once(monkeypatch: pytest.MonkeyPatch, marker: Path) -> None:
    """Make the executor's tasks kill their worker process the first time any of them runs
    (leaving ``marker``), then train as usual: a worker that dies once. The wrapper is a
    closure, so Ray ships it by value and the workers need not import this module."""
    train_batch = ray_executor.train_batch

    def dies_once(*args: object) -> dict:
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return train_batch(*args)

    monkeypatch.setattr(ray_executor, "_remote_train_batch", ray.remote(dies_once))


# The last tests: a worker that dies costs the next task a worker start.
def test_a_worker_that_dies_once_is_retried(config, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config("executor.max_retries=1", "executor.clients_per_batch=5")
    shared = shared_tensors()
    loss, model = parts(cfg, shared)
    marker = tmp_path / "crashed"
    crash_once(monkeypatch, marker)
    executor = RayExecutor(cfg, shared, loss, model)
    spec = RoundSpec(cfg.adapter, epochs=1)
    try:
        got = list(executor.train_adapters(make_jobs(model, 1), spec))
    finally:
        executor.close()
    assert marker.exists(), "the first attempt should have died"
    want = list(Sequential(shared, loss, parts(cfg, shared)[1]).train_adapters(
        make_jobs(model, 1), spec))
    assert_same(cfg, shared, got, want)


def test_a_lost_worker_names_its_nodes_and_round(config, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config("executor.max_retries=0")
    shared = shared_tensors()
    loss, model = parts(cfg, shared)
    crash_once(monkeypatch, tmp_path / "crashed")
    executor = RayExecutor(cfg, shared, loss, model)
    try:
        with pytest.raises(ResourceError) as err:
            list(executor.train_adapters(make_jobs(model, 2)[:2], RoundSpec(cfg.adapter, 1)))
    finally:
        executor.close()
    message = str(err.value)
    assert message.startswith("nodes 0, 1, round 2: the Ray task") and "\n" not in message
    assert "lost its worker once" in message and "executor.max_retries (now 0)" in message


def test_strategy_terms_travel_to_workers_and_back() -> None:
    """A job's proximal weight, linear term, FedGen batches and personal flag, and an update's
    mean gradient, survive packing for the object store."""
    start = {"w": torch.arange(6.0).view(2, 3)}
    batches = SyntheticBatches(torch.randn(2, 3, 1, 4), torch.tensor([[0, 1, 2], [2, 1, 0]]))
    jobs = [AdapterJob(0, torch.arange(3), start, None, 11, "node 0", mu=0.5,
                       linear={"w": -start["w"]}, synthetic=batches, personal=True),
            AdapterJob(1, torch.arange(3, 5), start, None, 12, "node 1")]
    back = ray_executor.unpack_jobs(ray_executor.pack_jobs(jobs), torch.device("cpu"))
    assert (back[0].mu, back[0].personal, back[1].mu, back[1].personal) == (0.5, True, 0.0, False)
    assert torch.equal(back[0].linear["w"], -start["w"]) and back[1].linear is None
    assert torch.equal(back[0].synthetic.features, batches.features)
    assert torch.equal(back[0].synthetic.labels, batches.labels) and back[1].synthetic is None
    updates = [LocalUpdate(0, start, 3, 0.1, None, {"w": start["w"] / 2}),
               LocalUpdate(1, start, 2, 0.2)]
    got = ray_executor.unpack_updates(ray_executor.pack_updates(updates), torch.device("cpu"))
    assert torch.equal(got[0].gradient_mean["w"], start["w"] / 2)
    assert got[1].gradient_mean is None
