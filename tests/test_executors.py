"""The batched executor against the sequential one (torch's AdamW and clip_grad_norm_ on one
module per client, the reference): same updates, in float64 to rounding and in whole runs to
float32 tolerance; batches that do not fit; no host round trip in the step loop."""

import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch

from conftest import HANG_GUARD_S, REPO
from flcore.clients.protocol import (
    AdapterJob,
    LocalUpdate,
    RoundSpec,
    SharedTensors,
    SyntheticBatches,
)
from flcore.clients.training import training_seed
from flcore.config import AdapterConfig, LrSchedule
from flcore.errors import ResourceError, TrainingError
from flcore.executors.batched import Batched
from flcore.executors.sequential import Sequential
from flcore.trainmodel.adapters import AdapterLoss, AudioAdapter, is_body

AUDIO, TEXT, CLASSES = 12, 8, 5


SEQUENCE = (3, 6)  # tokens and width of the class sequences of a sequence head


def federation(sizes: list[int], sequence: bool = False
               ) -> tuple[SharedTensors, list[torch.Tensor]]:
    """Random embeddings of ``sum(sizes)`` clips, dealt to clients of the given sizes (and
    class token sequences, with ``sequence``)."""
    g = torch.Generator().manual_seed(0)
    n = sum(sizes)
    shared = SharedTensors(torch.randn(n, 4, AUDIO, generator=g),
                           torch.randint(0, CLASSES, (n,), generator=g),
                           torch.randn(CLASSES, TEXT, generator=g), torch.arange(CLASSES),
                           [f"c{i}" for i in range(CLASSES)],
                           torch.randn(CLASSES, *SEQUENCE, generator=g) if sequence else None)
    order = torch.randperm(n, generator=g)
    return shared, list(order.split(sizes))


def strategy_terms(job: AdapterJob, steps: int, seed: int) -> AdapterJob:
    """``job`` with a random linear term and random FedGen batches of ``steps`` steps."""
    g = torch.Generator().manual_seed(seed)
    linear = {k: torch.randn(v.shape, generator=g) / 10 for k, v in job.start.items()}
    features = torch.randn(steps, 3, 2, 10, generator=g)
    return replace(job, linear=linear,
                   synthetic=SyntheticBatches(features, torch.randint(0, CLASSES, (steps, 3),
                                                                      generator=g)))


def train_both(config: AdapterConfig, sizes: list[int], rounds: int = 2, mu: float = 0.1,
               clients_per_batch: int = 64, sequence: bool = False, terms: bool = False,
               trainable: frozenset[str] | None = None
               ) -> tuple[list[list[LocalUpdate]], list[list[LocalUpdate]], AudioAdapter,
                          SharedTensors]:
    """``rounds`` rounds of every client from one start (FedProx-anchored, optimizer state
    kept between rounds) by each executor; the updates of each round (with a sequence head
    trained on class token sequences, with ``sequence``; with ``terms``, a linear term, FedGen
    batches and the mean gradient; only the ``trainable`` parameters stepped)."""
    shared, rows = federation(sizes, sequence)
    torch.manual_seed(1)
    model = AudioAdapter(AUDIO, TEXT, config, SEQUENCE if sequence else None)
    loss = AdapterLoss(config, shared.prompts, shared.label_space, shared.sequence)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    results = []
    for executor in (Sequential(shared, loss, model),
                     Batched(shared, loss, model, clients_per_batch)):
        states: list[dict | None] = [None] * len(sizes)
        rounds_out = []
        for round_ in range(1, rounds + 1):
            jobs = [AdapterJob(i, r, start, states[i], training_seed(0, round_, i), f"node {i}",
                               mu=mu * (i % 2 if terms else 1))
                    for i, r in enumerate(rows)]
            if terms:
                jobs = [strategy_terms(job, 2 * -(-len(job.rows) // config.batch_size), i)
                        for i, job in enumerate(jobs)]
            spec = RoundSpec(config, 2, start, keep_optimizer=trainable is None,
                             trainable=trainable, gradient_mean=terms,
                             synthetic_weight=0.5 if terms else 0.0)
            updates = list(executor.train_adapters(jobs, spec))
            states = [u.optimizer_state for u in updates] if trainable is None else states
            rounds_out.append(updates)
        results.append(rounds_out)
    return results[0], results[1], model, shared


def outputs(model: AudioAdapter, state: dict, tokens: torch.Tensor) -> torch.Tensor:
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return model(tokens)


SIZES = [5, 13, 32, 21]


@pytest.mark.parametrize(("schedule", "sequence"), [(LrSchedule.none, False),
                                                    (LrSchedule.cosine, False),
                                                    (LrSchedule.none, True)])
def test_batched_equals_sequential_in_float64(float64, schedule: LrSchedule,
                                              sequence: bool) -> None:
    config = AdapterConfig(hidden_dim=10, num_heads=2, dropout=0.3, batch_size=8, lr=0.01,
                           grad_clip=0.05, lr_schedule=schedule)
    sequential, batched, _, _ = train_both(config, SIZES, sequence=sequence)
    for seq_round, bat_round in zip(sequential, batched, strict=True):
        for a, b in zip(seq_round, bat_round, strict=True):
            assert (a.node, a.num_samples) == (b.node, b.num_samples)
            assert b.loss == pytest.approx(a.loss, rel=1e-9)
            for name in a.state:
                torch.testing.assert_close(b.state[name], a.state[name], rtol=1e-8, atol=1e-9)
            for i, entry in a.optimizer_state["state"].items():
                assert float(b.optimizer_state["state"][i]["step"]) == float(entry["step"])
                torch.testing.assert_close(b.optimizer_state["state"][i]["exp_avg"],
                                           entry["exp_avg"], rtol=1e-8, atol=1e-12)
    # Clients differ from one another: each drew its own minibatches and masks.
    first = sequential[0]
    assert not torch.allclose(first[1].state["lift.weight"], first[2].state["lift.weight"])
    if sequence:  # the head trained (its loss reached it) and dropout masked its attention
        assert not torch.allclose(first[1].state["sequence.queries"],
                                  first[2].state["sequence.queries"])


def test_strategy_terms_agree_in_float64(float64) -> None:
    """SCAFFOLD's and FedDyn's linear term, a proximal weight on every other client, FedGen's
    batches through the head and the mean gradient: the batched executor's updates and mean
    gradients equal the sequential's to rounding."""
    config = AdapterConfig(hidden_dim=10, num_heads=2, dropout=0.3, batch_size=8, lr=0.01,
                           grad_clip=0.05)
    sequential, batched, _, _ = train_both(config, SIZES, terms=True)
    plain, _, _, _ = train_both(config, SIZES)
    for seq_round, bat_round in zip(sequential, batched, strict=True):
        for a, b in zip(seq_round, bat_round, strict=True):
            assert b.loss == pytest.approx(a.loss, rel=1e-9)
            for name in a.state:
                torch.testing.assert_close(b.state[name], a.state[name], rtol=1e-8, atol=1e-9)
                torch.testing.assert_close(b.gradient_mean[name], a.gradient_mean[name],
                                           rtol=1e-8, atol=1e-10)
    # The terms changed the training: without them every client ends elsewhere.
    for a, b in zip(sequential[0], plain[0], strict=True):
        assert not torch.allclose(a.state["attend.out_weight"], b.state["attend.out_weight"])


def test_only_the_trainable_parameters_move(float64) -> None:
    """FedRep's phases: with the head's parameters trainable the body stays exactly where it
    started, and both executors agree on the head."""
    config = AdapterConfig(hidden_dim=10, num_heads=2, dropout=0.1, batch_size=8, lr=0.01)
    torch.manual_seed(1)  # the start train_both draws
    start = AudioAdapter(AUDIO, TEXT, config).state_dict()
    head = frozenset(n for n in start if not is_body(n))
    sequential, batched, _, _ = train_both(config, SIZES, rounds=1, trainable=head)
    for a, b in zip(sequential[0], batched[0], strict=True):
        for name, value in start.items():
            if is_body(name):
                assert torch.equal(a.state[name], value) and torch.equal(b.state[name], value)
            else:
                assert not torch.equal(a.state[name], value), name
                torch.testing.assert_close(b.state[name], a.state[name], rtol=1e-8, atol=1e-9)


def test_batches_of_clients_give_the_same_updates(float64) -> None:
    config = AdapterConfig(hidden_dim=10, num_heads=2, dropout=0.1, batch_size=8, lr=0.01)
    _, whole, model, shared = train_both(config, SIZES, rounds=1)
    _, pairs, _, _ = train_both(config, SIZES, rounds=1, clients_per_batch=3)
    for a, b in zip(whole[0], pairs[0], strict=True):
        torch.testing.assert_close(outputs(model, b.state, shared.tokens),
                                   outputs(model, a.state, shared.tokens), rtol=1e-9, atol=1e-10)


def test_float32_updates_agree_to_float_tolerance() -> None:
    config = AdapterConfig(hidden_dim=16, num_heads=2, dropout=0.1, batch_size=8, lr=0.003)
    sequential, batched, model, shared = train_both(config, SIZES)
    for a, b in zip(sequential[-1], batched[-1], strict=True):
        torch.testing.assert_close(outputs(model, b.state, shared.tokens),
                                   outputs(model, a.state, shared.tokens), rtol=1e-4, atol=1e-4)


def test_a_batch_that_does_not_fit_is_halved_then_reported(monkeypatch, caplog) -> None:
    config = AdapterConfig(hidden_dim=10, num_heads=2, batch_size=8)
    shared, rows = federation(SIZES)
    model = AudioAdapter(AUDIO, TEXT, config)
    loss = AdapterLoss(config, shared.prompts, shared.label_space)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    jobs = [AdapterJob(i, r, start, None, i, f"node {i}, round 1") for i, r in enumerate(rows)]
    spec = RoundSpec(config, 1)
    train_together = Batched.train_together
    limit = {"clients": 2}

    def fits(self: Batched, chunk: list[AdapterJob], s: RoundSpec) -> list[LocalUpdate]:
        if len(chunk) > limit["clients"]:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return train_together(self, chunk, s)

    monkeypatch.setattr(Batched, "train_together", fits)
    executor = Batched(shared, loss, model, clients_per_batch=4)
    updates = list(executor.train_adapters(jobs, spec))
    assert [u.node for u in updates] == [0, 1, 2, 3]
    assert executor.clients_per_batch == 2
    assert "executor.clients_per_batch=4 does not fit in device memory; going on with 2" in (
        caplog.text)
    reference = list(Sequential(shared, loss, model).train_adapters(jobs, spec))
    for a, b in zip(reference, updates, strict=True):
        torch.testing.assert_close(outputs(model, b.state, shared.tokens),
                                   outputs(model, a.state, shared.tokens), rtol=1e-4, atol=1e-4)

    limit["clients"] = 0
    with pytest.raises(ResourceError, match=r"node 0, round 1: one client's adapter does not "
                                            r"fit in device memory"):
        list(Batched(shared, loss, model, clients_per_batch=4).train_adapters(jobs, spec))


def test_the_step_loop_never_waits_on_the_device(monkeypatch) -> None:
    """``.item()``, ``bool()`` and ``.tolist()`` each make the host wait for the device; the
    batched executor may use them once an epoch (the NaN check) and once at the end."""
    config = AdapterConfig(hidden_dim=10, num_heads=2, dropout=0.1, batch_size=4)
    shared, rows = federation(SIZES)
    model = AudioAdapter(AUDIO, TEXT, config)
    loss = AdapterLoss(config, shared.prompts, shared.label_space)
    jobs = [AdapterJob(i, r, model.state_dict(), None, i, f"node {i}")
            for i, r in enumerate(rows)]
    calls = {"n": 0}
    for method in ("item", "tolist", "__bool__"):
        original = getattr(torch.Tensor, method)

        def counted(self: torch.Tensor, *args: object, _original: Callable = original) -> object:
            calls["n"] += 1
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, method, counted)
    epochs = 3
    list(Batched(shared, loss, model, 64).train_adapters(jobs, RoundSpec(config, epochs)))
    steps = epochs * (max(SIZES) // 4 + 1)
    assert calls["n"] <= epochs + 2 < steps


def test_a_nan_loss_names_the_client_and_epoch() -> None:
    config = AdapterConfig(hidden_dim=10, num_heads=2, batch_size=8)
    shared, rows = federation(SIZES)
    shared.tokens[rows[2][3]] = float("nan")
    model = AudioAdapter(AUDIO, TEXT, config)
    loss = AdapterLoss(config, shared.prompts, shared.label_space)
    jobs = [AdapterJob(i, r, model.state_dict(), None, i, f"node {i}, round 1")
            for i, r in enumerate(rows)]
    with pytest.raises(TrainingError, match=r"node 2, round 1, epoch 1: adapter loss is nan"):
        list(Batched(shared, loss, model, 64).train_adapters(jobs, RoundSpec(config, 2)))


@pytest.mark.parametrize("extra", [(), ("federation.algorithm=local",),
                                   ("federation.aggregation=fedprox",
                                    "federation.clients_per_round=3"),
                                   ("generator=unified", "generator.training_epochs=4",
                                    "server.adapter_training=fedavg+synthetic")])
def test_runs_give_the_same_final_values(run_config, extra: tuple) -> None:
    """Whole runs (FedAvg, local with per-client optimizer state, FedProx on a sample of
    clients, generators of every node trained as one bank and fine-tuning on their samples) by
    both executors agree to float32 tolerance."""
    common = ("logger=[csv]", "audio_encoder=mfcc", "generator=none", "federation.rounds=2",
              "checkpoint.every=0", *extra)
    finals = []
    for name in ("sequential", "batched"):
        finals.append(run_config(*common, f"executor={name}", folder=name)["final"])
    sequential, batched = finals
    assert sequential.keys() == batched.keys()
    for key, value in sequential.items():
        assert batched[key] == pytest.approx(value, rel=1e-4, abs=1e-4), key


@pytest.mark.gpu
def test_on_a_gpu_the_step_loop_makes_no_host_round_trip() -> None:
    """CUDA's sync debug mode warns at every call that makes the host wait for the device; a
    run of 3 epochs of 8 steps may wait a bounded number of times (the copies before the loop,
    the check once an epoch, the results), never once a step."""
    config = AdapterConfig(hidden_dim=10, num_heads=2, dropout=0.1, batch_size=4)
    shared, rows = federation(SIZES)
    device = torch.device("cuda")
    shared = SharedTensors(shared.tokens.to(device), shared.labels.to(device),
                           shared.prompts.to(device), shared.label_space.to(device),
                           shared.class_names)
    model = AudioAdapter(AUDIO, TEXT, config).to(device)
    loss = AdapterLoss(config, shared.prompts, shared.label_space)
    jobs = [AdapterJob(i, r.to(device), model.state_dict(), None, i, f"node {i}")
            for i, r in enumerate(rows)]
    executor = Batched(shared, loss, model, 64)
    epochs, steps = 3, 3 * (max(SIZES) // 4)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            executor.train_together(jobs, RoundSpec(config, epochs))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    waits = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(waits) < steps, [str(w.message) for w in waits[:5]]


def test_deterministic_kernels_run_the_batched_executor(run_config) -> None:
    """``deterministic=true`` switches torch to deterministic kernels only (an op without one
    would raise); a batched run with generators goes through, and repeats itself."""
    try:
        finals = [run_config("logger=[csv]", "audio_encoder=mfcc", "federation.rounds=1",
                             "generator.training_epochs=2", "checkpoint.every=0",
                             "deterministic=true", folder=f"run{i}")["final"] for i in range(2)]
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    assert finals[0] == finals[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without CUDA")
def test_gpus_that_do_not_exist_are_refused_before_any_data_is_read(run_config) -> None:
    with pytest.raises(ResourceError, match=r"executor\.num_gpus=0\.5: this machine has no CUDA "
                                            r"GPU"):
        run_config("logger=[csv]", "executor=ray", "executor.num_gpus=0.5", "dataset=folder",
                   "dataset.root=/nonexistent/collection")


def test_ray_executor_without_ray_installed_is_one_line(tmp_path, cache_dir) -> None:
    """Ray is the ``ray`` extra: ``executor=ray`` in an install without it stops before any work
    with the install command (here Ray is hidden from the import system, as if absent)."""
    hide_ray = ("import runpy, sys; sys.modules['ray'] = None; "
                f"sys.argv = ['main.py', 'executor=ray', 'logger=none', 'cache_dir={cache_dir}']; "
                f"runpy.run_path({str(REPO / 'main.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", hide_ray], cwd=tmp_path, capture_output=True,
                          text=True, timeout=HANG_GUARD_S, check=False,
                          env={**os.environ, "WANDB_SILENT": "true"})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        'error: executor=ray: Ray is not installed; pip install -e ".[ray]" (or use '
        "executor=batched, which needs nothing more)"]
    assert "Embeddings" not in proc.stdout + proc.stderr
