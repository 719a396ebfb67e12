"""Build everything from the config, run it, and write the run's outputs (DESIGN.md)."""

import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from flcore import checkpoint
from flcore.clients.clientA2V import ClientA2V
from flcore.clients.clientbase import SharedTensors
from flcore.config import Algorithm, Config, LabelSpace, validate, without_hydra
from flcore.data import load_dataset
from flcore.data.embeddings import encode_dataset
from flcore.data.partition import Partition, build_partition
from flcore.errors import ConfigError
from flcore.files import write_json
from flcore.metrics.classification import save_confusion_png
from flcore.runtime import environment, resolve_device, seed_everything
from flcore.servers.serverA2V import ServerA2V
from flcore.tracking import JobInfo, Trackers, build_trackers

log = logging.getLogger(__name__)


@dataclass
class Results:
    """The contents of results.json; written at the end of every run, failed ones included."""

    experiment: str
    status: str = "running"
    config: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    partition: dict[str, Any] = field(default_factory=dict)
    embeddings: dict[str, Any] = field(default_factory=dict)
    per_class: dict[str, float] = field(default_factory=dict)
    generator_epochs: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        payload = dict(self.__dict__)
        if self.error is None:
            del payload["error"]
        return payload


def job_info(cfg: DictConfig, run_dir: Path | None = None) -> JobInfo:
    """The Hydra job's folder, tracker group (experiment + sweep id) and name (its overrides)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    name = str(cfg.get("name", "default"))
    if not HydraConfig.initialized():
        assert run_dir is not None, "run_dir is required outside a Hydra job"
        return JobInfo(Path(run_dir), f"{name}-{Path(run_dir).name}", name)
    hc = HydraConfig.get()
    folder = Path(run_dir or hc.runtime.output_dir)
    sweep_id = Path(hc.sweep.dir if hc.mode == RunMode.MULTIRUN else hc.run.dir).name
    return JobInfo(folder, f"{name}-{sweep_id}", hc.job.override_dirname or name)


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    body = without_hydra(cfg)
    return OmegaConf.to_container(body, resolve=True, enum_to_str=True)  # type: ignore[return-value]


def build_clients(partition: Partition, algorithm: Algorithm,
                  device: torch.device) -> list[ClientA2V]:
    """One client per node (with its granularity override), or one client holding every node's
    clips (``centralized``)."""
    def index(values: Any) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.long, device=device)

    if algorithm is Algorithm.centralized:
        merged = {s: torch.cat([index(getattr(n, s)) for n in partition.nodes])
                  for s in ("train", "val", "test")}
        return [ClientA2V(0, partition.classes, merged["train"], merged["val"], merged["test"])]
    return [ClientA2V(n.node, n.classes, index(n.train), index(n.val), index(n.test),
                      n.granularity) for n in partition.nodes]


def check_class_groups(config: Config, partition: Partition) -> None:
    """``generator.class_groups`` may name only the federation's classes; the classes in no
    group are reported once (they form the group ``other``)."""
    groups = config.generator.class_groups
    if not groups:
        return
    named = [c for members in groups.values() for c in members]
    unknown = sorted(set(named) - set(partition.classes))
    if unknown:
        raise ConfigError(f"generator.class_groups names classes the federation does not have: "
                          f"{', '.join(unknown)} (its classes: {', '.join(partition.classes)})")
    ungrouped = [c for c in partition.classes if c not in named]
    if ungrouped:
        log.info("Classes in no generator.class_groups group go to the group 'other': %s",
                 ", ".join(ungrouped))


def label_space(config: Config, partition: Partition) -> list[int]:
    """Class ids the zero-shot classifier chooses from (sorted)."""
    if config.eval.label_space is LabelSpace.dataset:
        return list(range(len(partition.class_names)))
    return [partition.class_names.index(c) for c in partition.classes]


def run(cfg: DictConfig, run_dir: Path | None = None) -> dict[str, Any]:
    """Run one job; return the results.json payload. Raises FedA2VError on bad input."""
    job = job_info(cfg, run_dir)
    results = Results(experiment=str(cfg.get("name", "default")))
    trackers: Trackers | None = None
    started = time.perf_counter()
    try:
        config = validate(cfg)
        results.config = resolved_config(cfg)
        seed_everything(config.seed)
        device = resolve_device(config.device)
        results.environment = environment(device)
        resumed = None
        if config.resume:
            resumed = checkpoint.load_latest(job.run_dir)
            checkpoint.check_config(resumed["config"], results.config)
            log.info("Resuming %s after round %d", job.run_dir, resumed["round"])
        trackers = build_trackers(config.logger, job, results.config,
                                  resume_round=resumed["round"] if resumed else None,
                                  run_id=resumed.get("tracker_run_id") if resumed else None)

        tic = time.perf_counter()
        dataset = load_dataset(config.dataset, config.cache_dir)
        partition = build_partition(dataset, config.dataset, config.federation, config.seed)
        results.timings["data_s"] = time.perf_counter() - tic
        log.info("Dataset %s: %d clips, %d classes\n%s", dataset.root, len(dataset.clips),
                 len(dataset.class_names), partition.table())

        tic = time.perf_counter()
        embeddings = encode_dataset(config, dataset)
        results.timings["embedding_s"] = time.perf_counter() - tic
        results.embeddings = embeddings.summary()
        log.info("Embeddings: audio %s (%s), text %s (%s) in %.2f s",
                 list(embeddings.audio.shape),
                 "cached" if embeddings.audio_cached else "computed",
                 list(embeddings.text.shape), "cached" if embeddings.text_cached else "computed",
                 results.timings["embedding_s"])

        stats = {**partition.stats(), "skipped_files": len(dataset.skipped)}
        results.partition = {
            **stats,
            "dataset_root": str(dataset.root),
            "skipped": dataset.skipped,
            "nodes": [{"node": n.node, "classes": n.classes, **n.counts()}
                      for n in partition.nodes],
        }
        scalars = {f"partition/{k}": v for k, v in stats.items()}
        if resumed is None:
            trackers.log(scalars, step=0)

        check_class_groups(config, partition)
        shared = SharedTensors(
            tokens=embeddings.audio.to(device),
            labels=torch.as_tensor(dataset.labels, device=device),
            prompts=embeddings.text.to(device),
            label_space=torch.tensor(label_space(config, partition), device=device),
            class_names=list(dataset.class_names))
        server = ServerA2V(config, build_clients(partition, config.federation.algorithm, device),
                           shared, trackers, job.run_dir,
                           {"config": results.config, "tracker_run_id": trackers.run_id})
        start = 0
        if config.generator.load_from and resumed is None:
            server.load_generators(config.generator.load_from, results.config)
        if resumed is not None:
            server.load_state_dict(resumed["server"])
            server.history = list(resumed["history"])
            checkpoint.restore_rng(resumed["rng"])
            start = resumed["round"]
        tic = time.perf_counter()
        history = server.run(start)
        results.timings["rounds_s"] = time.perf_counter() - tic
        results.timings["generator_train_s"] = server.generator_seconds
        results.generator_epochs = server.epoch_history

        results.rounds = [{"round": 0, **scalars}, *history]
        results.final = {k: v for row in results.rounds for k, v in row.items()
                         if k != "round" and not k.startswith("time/")}
        report = server.final_report(dataset.class_names)
        if report is not None:
            results.per_class, matrix = report
            png = save_confusion_png(matrix, list(results.per_class), job.run_dir /
                                     "confusion_matrix.png")
            trackers.log_image("global/confusion_matrix", png, step=config.federation.rounds)
            log.info("Per-class accuracy of the global adapter:\n%s", "\n".join(
                f"  {name:<28} {acc:6.3f}" for name, acc in results.per_class.items()))
        headline = ("global/", "local/acc_mean", "synthetic/acc")
        log.info("Final: %s", ", ".join(f"{k}={v:.4f}" for k, v in results.final.items()
                                        if k.startswith(headline)))
        results.status = "completed"
        return results.to_dict()
    except BaseException as err:
        results.status = "failed"
        results.error = f"{type(err).__name__}: {err}"
        log.debug("Run failed:\n%s", traceback.format_exc())
        raise
    finally:
        results.timings["total_s"] = time.perf_counter() - started
        try:
            if trackers is not None:
                trackers.finish(failed=results.status != "completed")
        finally:
            write_json(job.run_dir / "results.json", results.to_dict())
            log.info("Results (%s) in %s", results.status, job.run_dir / "results.json")
