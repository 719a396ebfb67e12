"""Build everything from the config, run it, and write the run's outputs (DESIGN.md)."""

import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from flcore.config import validate, without_hydra
from flcore.data import load_dataset
from flcore.data.embeddings import encode_dataset
from flcore.data.partition import build_partition
from flcore.files import write_json
from flcore.runtime import environment, resolve_device, seed_everything
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
        trackers = build_trackers(config.logger, job, results.config)

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
        log.info("Embeddings: audio %s (%s, %s), text %s (%s, %s) in %.2f s",
                 list(embeddings.audio.shape), config.audio_encoder.name.value,
                 "cached" if embeddings.audio_cached else "computed",
                 list(embeddings.text.shape), config.text_encoder.name.value,
                 "cached" if embeddings.text_cached else "computed",
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
        trackers.log(scalars, step=0)
        results.rounds.append({"round": 0, **scalars})
        results.final = scalars
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
