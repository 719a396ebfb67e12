"""Batches of a round's clients as Ray tasks, on a local Ray started inside the run or a cluster.

Once per run the executor starts (``executor.address=null``) or joins (``auto``, ``host:port``)
Ray and puts the shared embeddings in the object store. A round ships only what its jobs carry
(index tensors, start states, optimizer states, seeds) and the round's spec: every batch of up
to ``executor.clients_per_batch`` clients becomes one task with ``executor.num_cpus`` CPUs and
``executor.num_gpus`` GPUs, all submitted at once. A worker keeps the embeddings (on its GPU when
its task got one) between tasks and trains its batch with the batched trainer, so the results
equal the sequential executor's to float tolerance. A worker that dies is retried
``executor.max_retries`` times, then reported as one line naming its nodes and round; an error
raised by training itself (a diverged loss) is never retried and reaches the user unchanged.
"""

import logging
import math
import re
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import ray
import torch

from flcore.clients.protocol import AdapterJob, LocalUpdate, RoundSpec, SharedTensors
from flcore.clients.training import build_adapter, build_adapter_loss
from flcore.config import AdapterConfig, Config, ExecutorConfig
from flcore.errors import ConfigError, ResourceError
from flcore.executors.base import Executor
from flcore.executors.resources import check_executor
from flcore.runtime import thread_share, use_threads
from flcore.trainmodel.adapters import AdapterLoss, AudioAdapter

log = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _to(tree: Any, device: torch.device | str) -> Any:
    """Every tensor of a (nested dict / list of) state moved to ``device``."""
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: _to(v, device) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_to(v, device) for v in tree)
    return tree


def describe(jobs: Sequence[AdapterJob]) -> str:
    """``node 3, round 2`` or ``nodes 3, 5, round 2``: the clients of a task, from the jobs."""
    rounds = sorted({m.group(1) for job in jobs if (m := re.search(r"round (\d+)", job.who))})
    text = ("node " if len(jobs) == 1 else "nodes ") + ", ".join(str(j.node) for j in jobs)
    return f"{text}, round {rounds[0]}" if len(rounds) == 1 else text


# ---------------------------------------------------------------------------------------------
# What travels: a task's states stacked into one tensor per parameter (and per optimizer entry),
# since pickling costs per tensor far more than per byte (a client's state is a dozen tensors).

def _stack_states(states: list[dict[str, torch.Tensor]]) -> dict:
    """One state for all (when every client holds the very same one) or ``name: [C, ...]``."""
    if all(state is states[0] for state in states):
        return {"same": _to(states[0], "cpu")}
    return {"stacked": {n: torch.stack([s[n] for s in states]).cpu() for n in states[0]}}


def _unstack_state(packed: dict, c: int, clone: bool) -> dict[str, torch.Tensor]:
    if "same" in packed:
        return packed["same"]
    return {n: v[c].clone() if clone else v[c] for n, v in packed["stacked"].items()}


def _stack_optimizers(states: list[dict | None]) -> dict | None:
    """``torch.optim`` state dicts (None: none yet) as ``{index: {key: [C, ...]}}``."""
    present = [state is not None for state in states]
    if not any(present):
        return None
    first = next(state for state in states if state is not None)

    def column(i: Any, key: str) -> torch.Tensor:
        like = torch.as_tensor(first["state"][i][key])
        return torch.stack([torch.as_tensor(s["state"][i][key]) if s is not None
                            else torch.zeros_like(like) for s in states]).cpu()

    return {"present": present, "groups": first["param_groups"],
            "state": {i: {k: column(i, k) for k in entry} for i, entry in first["state"].items()}}


def _unstack_optimizer(packed: dict | None, c: int, clone: bool) -> dict | None:
    if packed is None or not packed["present"][c]:
        return None
    return {"state": {i: {k: v[c].clone() if clone else v[c] for k, v in entry.items()}
                      for i, entry in packed["state"].items()},
            "param_groups": [dict(g) for g in packed["groups"]]}


def pack_jobs(jobs: Sequence[AdapterJob]) -> dict:
    return {"nodes": [j.node for j in jobs], "seeds": [j.seed for j in jobs],
            "who": [j.who for j in jobs], "sizes": [len(j.rows) for j in jobs],
            "rows": torch.cat([j.rows.cpu() for j in jobs]),
            "start": _stack_states([j.start for j in jobs]),
            "optimizer": _stack_optimizers([j.optimizer_state for j in jobs]),
            "mu": [j.mu for j in jobs], "personal": [j.personal for j in jobs],
            "linear": [j.linear for j in jobs], "synthetic": [j.synthetic for j in jobs]}


def unpack_jobs(packed: dict, device: torch.device) -> list[AdapterJob]:
    packed = _to(packed, device)
    rows = packed["rows"].split(packed["sizes"])
    return [AdapterJob(node, rows[c], _unstack_state(packed["start"], c, clone=False),
                       _unstack_optimizer(packed["optimizer"], c, clone=False), seed, who,
                       packed["mu"][c], packed["linear"][c], packed["synthetic"][c],
                       packed["personal"][c])
            for c, (node, seed, who) in enumerate(zip(packed["nodes"], packed["seeds"],
                                                      packed["who"], strict=True))]


def pack_updates(updates: list[LocalUpdate]) -> dict:
    return {"nodes": [u.node for u in updates], "sizes": [u.num_samples for u in updates],
            "losses": [u.loss for u in updates],
            "state": {n: torch.stack([u.state[n].detach() for u in updates]).cpu()
                      for n in updates[0].state},
            "optimizer": _stack_optimizers([u.optimizer_state for u in updates]),
            "gradient_mean": [_to(u.gradient_mean, "cpu") for u in updates]}


def unpack_updates(packed: dict, device: torch.device) -> list[LocalUpdate]:
    """Each client's update with tensors of its own (a checkpoint then saves that client's
    tensors, not the whole task's)."""
    state = {"stacked": _to(packed["state"], device)}
    return [LocalUpdate(node, _unstack_state(state, c, clone=True), size, loss,
                        _unstack_optimizer(packed["optimizer"], c, clone=True),
                        _to(packed["gradient_mean"][c], device))
            for c, (node, size, loss) in enumerate(zip(packed["nodes"], packed["sizes"],
                                                       packed["losses"], strict=True))]


# ---------------------------------------------------------------------------------------------
# The worker side.

# What a worker process keeps between tasks: the embeddings of the run it serves (moved to its
# device once) and the trainer built on them. One entry: a worker serves one run.
_WORKER_CACHE: dict[tuple[str, str], Any] = {}


def _worker_trainer(box: list, device: torch.device) -> Any:
    """The batched trainer over the run's embeddings on ``device``, built once per worker."""
    from flcore.executors.batched import Batched

    key = (box[0].hex(), str(device))
    if key not in _WORKER_CACHE:
        _WORKER_CACHE.clear()
        payload = ray.get(box[0])
        shared = SharedTensors(*(_to(payload[k], device) for k in (
            "tokens", "labels", "prompts", "label_space")), payload["class_names"],
            sequence=_to(payload["sequence"], device))
        config: AdapterConfig = payload["adapter"]
        _WORKER_CACHE[key] = Batched(shared, build_adapter_loss(shared, config),
                                     build_adapter(shared, config), clients_per_batch=1)
    return _WORKER_CACHE[key]


def train_batch(box: list, packed_jobs: dict, spec: RoundSpec, threads: int) -> dict:
    """One task: the jobs of :func:`pack_jobs` trained together on this worker's device; their
    updates packed by :func:`pack_updates`, on the CPU.

    ``box`` holds the object-store reference of the run's embeddings (in a list, so that Ray
    hands over the reference and the worker fetches the embeddings only the first time)."""
    use_threads(threads)
    device = torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")
    trainer = _worker_trainer(box, device)
    jobs = unpack_jobs(packed_jobs, device)
    trainer.clients_per_batch = len(jobs)  # halves itself when the batch overflows the GPU
    if device.type == "cuda":
        spec = replace(spec, anchor=_to(spec.anchor, device))
    return pack_updates(list(trainer.train_adapters(jobs, spec)))


def warm_up(box: list, threads: int) -> None:
    """A task that imports the trainer and fetches the embeddings into its worker, so that the
    first round does not pay for it."""
    use_threads(threads)
    _worker_trainer(box, torch.device(
        "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"))


_remote_train_batch = ray.remote(train_batch)
_remote_warm_up = ray.remote(warm_up)


# ---------------------------------------------------------------------------------------------
# The driver side.

def _parse_address(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``host:port`` or ``ray://host:port`` address; None for ``auto``."""
    if address == "auto":
        return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"executor.address={address}: must be null (a local Ray), auto (the "
                          "cluster this machine belongs to) or host:port of a Ray head")
    return host.strip("[]"), int(port)


def connect(address: str, timeout: float) -> None:
    """Join the Ray cluster at ``address`` within ``timeout`` seconds, or raise one
    :class:`ResourceError` naming the address and the fix (``ray.init`` alone would retry for
    minutes): the head's port is probed first, then ``ray.init`` runs with a deadline."""
    fix = ("start one there (`ray start --head --port=PORT`), fix executor.address, raise "
           "executor.connect_timeout_s, or set executor.address=null to start a local Ray "
           "inside the run")
    where = _parse_address(address)
    deadline = time.monotonic() + timeout
    if where is not None:
        try:
            socket.create_connection(where, timeout=timeout).close()
        except OSError as err:
            raise ResourceError(f"executor.address={address}: no Ray cluster answers there "
                                f"({err.strerror or err}); {fix}") from None
    outcome: dict[str, BaseException | None] = {}

    def init() -> None:
        try:
            ray.init(address=address, logging_level=logging.ERROR, ignore_reinit_error=True)
            outcome["error"] = None
        except BaseException as err:  # handed to the caller
            outcome["error"] = err

    thread = threading.Thread(target=init, name="ray-connect", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if "error" not in outcome:
        raise ResourceError(f"executor.address={address}: no Ray cluster answered within "
                            f"executor.connect_timeout_s={timeout:g} s; {fix}")
    if outcome["error"] is not None:
        first = str(outcome["error"]).strip().splitlines()[0] if str(outcome["error"]) else ""
        raise ResourceError(f"executor.address={address}: could not join the Ray cluster "
                            f"({type(outcome['error']).__name__}: {first}); {fix}"
                            ) from outcome["error"]


def _local_cpus(wanted: float) -> int:
    """CPUs a local Ray offers: the run's threads (its share of the machine, which its tasks
    then split), and at least one task's worth."""
    return max(torch.get_num_threads(), math.ceil(wanted))


class RayExecutor(Executor):
    """Runs each batch of up to ``executor.clients_per_batch`` clients as a Ray task. Generators
    train in the driver, every node's as one stacked bank (as the batched executor does): their
    states stay where the server keeps them between rounds."""

    stack_generators = True

    def __init__(self, config: Config, shared: SharedTensors, loss: AdapterLoss,
                 model: AudioAdapter) -> None:
        super().__init__(shared)
        self.x: ExecutorConfig = config.executor
        self.loss, self.model = loss, model
        self.owns_ray = False
        self.shared_box: list | None = None
        x, tic = self.x, time.perf_counter()
        check_executor(config)
        if ray.is_initialized():
            log.info("executor=ray: using the Ray this process already joined")
        elif x.address is None:
            ray.init(num_cpus=_local_cpus(x.num_cpus),
                     num_gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0,
                     include_dashboard=False, logging_level=logging.ERROR,
                     ignore_reinit_error=True)
            self.owns_ray = True
        else:
            connect(x.address, x.connect_timeout_s)
        try:
            self._check_resources()
            payload = {"tokens": shared.tokens.cpu(), "labels": shared.labels.cpu(),
                       "prompts": shared.prompts.cpu(), "label_space": shared.label_space.cpu(),
                       "sequence": _to(shared.sequence, "cpu"),
                       "class_names": list(shared.class_names), "adapter": config.adapter}
            self.shared_box = [ray.put(payload)]
            workers = self._warm_up()
        except BaseException:
            self.close()
            raise
        if shared.tokens.device.type == "cuda" and x.num_gpus == 0:
            log.warning("executor=ray with executor.num_gpus=0: clients train on the CPUs of "
                        "Ray workers while the run is on %s; set executor.num_gpus (e.g. 0.25) "
                        "to train them on GPUs", shared.tokens.device)
        log.info("executor=ray: %s ready, %d worker(s) warmed up, in %.1f s",
                 "a local Ray" if self.owns_ray else f"Ray at {x.address or 'this process'}",
                 workers, time.perf_counter() - tic)

    def _check_resources(self) -> None:
        """Fail now, not with a task that waits forever: some node must hold one task's CPUs
        and GPUs."""
        x = self.x
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        where = (f"executor.address={x.address}" if x.address is not None
                 else "the local Ray")
        gpus = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
        if x.num_gpus > 0 and gpus < x.num_gpus:
            raise ResourceError(
                f"executor.num_gpus={x.num_gpus:g}: no node of {where} has that many GPUs "
                f"(at most {gpus:g}); set executor.num_gpus=0 or at most {gpus:g}, or use a "
                "cluster with GPUs")
        cpus = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
        if cpus < x.num_cpus:
            raise ResourceError(
                f"executor.num_cpus={x.num_cpus:g}: no node of {where} has that many CPUs "
                f"(at most {cpus:g}); lower executor.num_cpus")

    def _warm_up(self) -> int:
        """Start as many workers as tasks can run at once (at most 64) and have them load the
        embeddings, waiting at most ``executor.connect_timeout_s``: Ray's start-up stays out of
        the rounds, and workers that cannot run FedA2V's code fail here with one line."""
        x, total = self.x, ray.cluster_resources()
        slots = total.get("CPU", 0.0) / x.num_cpus
        if x.num_gpus > 0:
            slots = min(slots, total.get("GPU", 0.0) / x.num_gpus)
        options = {"num_cpus": x.num_cpus, "num_gpus": x.num_gpus, "max_retries": 0}
        refs = [_remote_warm_up.options(**options).remote(self.shared_box, self.threads)
                for _ in range(max(1, min(64, math.floor(slots))))]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=x.connect_timeout_s)
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayTaskError as err:
                cause = err.cause if isinstance(err.cause, BaseException) else err
                if not isinstance(cause, ImportError):
                    raise cause from None
                first = (str(cause).strip().splitlines() or [""])[0]
                raise ResourceError(
                    f"executor=ray: a Ray worker cannot run FedA2V's tasks "
                    f"({type(cause).__name__}: {first}); install this project (pip install -e "
                    ".) in the Python every node of the cluster runs") from None
            except ray.exceptions.RayError:
                pass  # a lost worker: Ray starts another, and a round reports what persists
        return len(ready)

    @property
    def threads(self) -> int:
        """Torch threads of a task: its whole CPUs (``executor.num_cpus``), at least one."""
        return thread_share(math.floor(self.x.num_cpus))

    def train_adapters(self, jobs: Sequence[AdapterJob], spec: RoundSpec
                       ) -> Iterator[LocalUpdate]:
        if not jobs:
            return
        if self.shared_box is None:
            raise RuntimeError("RayExecutor.train_adapters after close()")
        x, device = self.x, self.shared.tokens.device
        options = {"num_cpus": x.num_cpus, "num_gpus": x.num_gpus,
                   "max_retries": x.max_retries, "retry_exceptions": False}
        spec_ref = ray.put(replace(spec, anchor=_to(spec.anchor, "cpu")))
        batches = [jobs[i : i + x.clients_per_batch]
                   for i in range(0, len(jobs), x.clients_per_batch)]
        refs = [_remote_train_batch.options(**options).remote(
                    self.shared_box, pack_jobs(batch), spec_ref, self.threads)
                for batch in batches]
        # The rest of a round that fails is left to finish and dropped, not cancelled:
        # cancelling a task whose reply is in flight aborts the driver in Ray 2.60
        # ("Tried to complete task that was not pending").
        for batch, ref in zip(batches, refs, strict=True):
            yield from unpack_updates(self._get(ref, batch), device)

    def _get(self, ref: ray.ObjectRef, batch: Sequence[AdapterJob]) -> dict:
        """A task's packed updates; its training error as raised, or a lost worker as one line."""
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, BaseException):
                raise err.cause from None
            raise
        except ray.exceptions.RayError as err:
            tries = self.x.max_retries + 1
            reason = _ANSI.sub("", str(err)).strip().splitlines()
            times = "once" if tries == 1 else f"{tries} times, every attempt"
            raise ResourceError(
                f"{describe(batch)}: the Ray task training these clients lost its worker "
                f"{times} ({type(err).__name__}: {reason[0] if reason else 'no detail'}); "
                "raise executor.max_retries "
                f"(now {self.x.max_retries}), or give each task more memory with a lower "
                "executor.clients_per_batch or a higher executor.num_cpus") from None

    def close(self) -> None:
        self.shared_box = None  # frees the embeddings in the object store
        if self.owns_ray and ray.is_initialized():
            ray.shutdown()
        self.owns_ray = False
        super().close()
