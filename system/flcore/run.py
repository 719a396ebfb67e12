"""Build everything from the config, run it, and write the run's outputs (DESIGN.md)."""

import logging
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from flcore import checkpoint
from flcore.clients.clientA2V import ClientA2V
from flcore.clients.protocol import SharedTensors
from flcore.config import (
    Algorithm,
    Config,
    LabelSpace,
    validate,
    without_hydra,
)
from flcore.data import AudioDataset, load_dataset
from flcore.data.embeddings import Embeddings, dataset_fingerprint, encode_dataset
from flcore.data.partition import Partition, build_partition
from flcore.encoders.audio import min_clip_seconds
from flcore.errors import ConfigError, FedA2VError, RunInterrupted
from flcore.executors.resources import check_executor
from flcore.files import (
    atomic_write_text,
    remove_stale_temporaries,
    require_writable_dir,
    write_csv,
    write_json,
)
from flcore.metrics.classification import save_confusion_png
from flcore.resume import (
    holds_run,
    interrupt_message,
    plan_resume,
    resume_point,
    sweep_folder,
)
from flcore.runtime import (
    available_cpus,
    environment,
    resolve_device,
    seed_everything,
    set_determinism,
    thread_share,
    use_threads,
)
from flcore.servers.generator_quality import GeneratorQuality
from flcore.servers.serverA2V import ServerA2V
from flcore.servers.strategies import unguarded_warnings
from flcore.sweep import concurrent_jobs, short_name, swept_keys
from flcore.tracking import JobInfo, Trackers, build_trackers
from flcore.visual.renderer import check_images

log = logging.getLogger(__name__)


@dataclass
class Results:
    """The contents of results.json; written at the end of every run, failed ones included."""

    experiment: str
    status: str = "running"
    config: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    partition: dict[str, Any] = field(default_factory=dict)
    embeddings: dict[str, Any] = field(default_factory=dict)
    per_class: dict[str, float] = field(default_factory=dict)
    generator_epochs: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    generator_quality: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def summarize(self, history: list[dict[str, Any]]) -> None:
        """Rounds after round 0, ``final`` (each key's latest value: every evaluated key of the
        last round, generator keys of the last generator round) and ``best``."""
        self.rounds = [*self.rounds[:1], *history]
        self.final = {k: v for row in self.rounds for k, v in row.items()
                      if k != "round" and not k.startswith("time/")}
        self.best = best_block(self.rounds)

    def to_dict(self) -> dict[str, Any]:
        payload = dict(self.__dict__)
        if self.error is None:
            del payload["error"]
        return payload


def job_info(cfg: DictConfig, run_dir: Path | None = None) -> JobInfo:
    """The Hydra job's folder, tracker group (experiment + sweep id) and name: in a sweep the
    values of the swept keys (``beta_warmup_ratio=0.25,seed=1``), else the job's overrides."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    name = str(cfg.get("name", "default"))
    if not HydraConfig.initialized():
        assert run_dir is not None, "run_dir is required outside a Hydra job"
        return JobInfo(Path(run_dir), f"{name}-{Path(run_dir).name}", name)
    hc = HydraConfig.get()
    folder = Path(run_dir or hc.runtime.output_dir)
    sweeping = hc.mode == RunMode.MULTIRUN
    sweep_id = Path(hc.sweep.dir if sweeping else hc.run.dir).name
    keys = swept_keys(Path(hc.sweep.dir)) if sweeping else None
    return JobInfo(folder, f"{name}-{sweep_id}",
                   short_name(list(hc.overrides.task), keys) or name)


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


def shared_tensors(config: Config, dataset: AudioDataset, partition: Partition,
                   embeddings: Embeddings, device: torch.device) -> SharedTensors:
    """The embeddings every client indexes into, on the run's device."""
    text = embeddings.text
    return SharedTensors(
        tokens=embeddings.audio.to(device),
        labels=torch.as_tensor(dataset.labels, device=device),
        prompts=text.pooled.to(device),
        label_space=torch.tensor(label_space(config, partition), device=device),
        class_names=list(dataset.class_names),
        sequence=None if text.sequence is None else text.sequence.to(device),
        pooled_raw=None if text.pooled_raw is None else text.pooled_raw.to(device))


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


HEADLINE = ("global/acc", "global/balanced_acc", "global/macro_f1", "val/acc", "local/acc_mean",
            "synthetic/acc", "synthetic/accepted_rounds", "synthetic/acceptance_rate", "gen/fd",
            "gen/spread_ratio", "gen/active_units", "gen/kl", "global/sequence_acc", "images/acc",
            "privacy/epsilon", "privacy/client_epsilon")


def job_overrides(cfg: DictConfig) -> list[str]:
    """The job's own command-line overrides (one job's, in a sweep)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def write_hydra_files(cfg: DictConfig, run_dir: Path) -> None:
    """``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml``, written only once the job
    owns its folder (Hydra's own copy is off, so that a refused resume cannot overwrite them)."""
    from hydra.core.hydra_config import HydraConfig

    folder = run_dir / ".hydra"
    atomic_write_text(folder / "config.yaml", OmegaConf.to_yaml(without_hydra(cfg)))
    if HydraConfig.initialized():
        hydra_cfg = OmegaConf.create({"hydra": HydraConfig.get()})
        atomic_write_text(folder / "hydra.yaml", OmegaConf.to_yaml(hydra_cfg))
        atomic_write_text(folder / "overrides.yaml",
                          OmegaConf.to_yaml(OmegaConf.create(job_overrides(cfg))))


def best_block(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Test metrics of the round with the best ``val/acc`` (the first on ties); empty without a
    validation split. Never selected on test."""
    scored = [r for r in rounds if "val/acc" in r]
    if not scored:
        return {}
    best = max(scored, key=lambda r: r["val/acc"])
    keep = ("global/", "val/", "synthetic/acc", "local/acc_mean")
    return {"round": best["round"], **{k: v for k, v in best.items() if k.startswith(keep)}}


def save_plots(results: Results, folder: Path) -> None:
    """``metrics.png`` (accuracies over rounds) and ``generator.png`` (loss terms and beta
    over generator epochs) in the run folder's ``plots/``."""
    from flcore.plots import plot_generator_epochs, plot_rounds

    plot_rounds(results.rounds, folder / "metrics.png")
    plot_generator_epochs(results.generator_epochs, folder / "generator.png")


def save_generator_quality(quality: GeneratorQuality, results: Results, run_dir: Path,
                           trackers: Trackers, step: int) -> None:
    """The last scoring's per-class table (``generator_quality.csv``, a wandb Table, and
    ``results.json`` with the reasons of undefined metrics) and ``plots/kl_per_dimension.png``."""
    from flcore.plots import plot_kl_per_dimension

    columns = list(dict.fromkeys(k for row in quality.per_class for k in row))
    write_csv(run_dir / "generator_quality.csv", columns, quality.per_class)
    trackers.log_table("gen/per_class", quality.per_class, step)
    results.generator_quality = {"held_out": quality.held_out, "per_class": quality.per_class,
                                 "undefined": quality.undefined}
    png = plot_kl_per_dimension(quality.kl_per_dimension, run_dir / "plots" /
                                "kl_per_dimension.png")
    if png is not None:
        trackers.log_image("gen/kl_per_dimension", png, step)


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(cfg: DictConfig, run_dir: Path | None = None) -> dict[str, Any]:
    """Run one job; return the results.json payload. Raises FedA2VError on bad input and
    RunInterrupted on Ctrl-C or SIGTERM, after writing results.json with the rounds so far.

    A folder that already holds a run is never overwritten: a new run there is refused, and a
    resume writes nothing until its checkpoint and config are accepted."""
    job = job_info(cfg, run_dir)
    overrides = job_overrides(cfg)
    results = Results(experiment=str(cfg.get("name", "default")),
                      environment={"overrides": overrides})
    sweep = sweep_folder()
    owned = not holds_run(job.run_dir)
    resume = bool(cfg.get("resume", False))
    if not owned and not resume:
        raise ConfigError(f"hydra.run.dir={job.run_dir}: this folder already holds a run; pass "
                          "resume=true to continue it, or another hydra.run.dir for a new run")
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = (signal.signal(signal.SIGTERM, _raise_on_sigterm) if in_main_thread
                        else None)
    trackers: Trackers | None = None
    server: ServerA2V | None = None
    started = time.perf_counter()
    previous_total = 0.0
    try:
        config = validate(cfg)
        results.config = resolved_config(cfg)
        require_writable_dir(Path(config.cache_dir), "cache_dir", env="FEDA2V_CACHE_DIR")
        require_writable_dir(job.run_dir, "hydra.run.dir")
        cpus, jobs = available_cpus(), concurrent_jobs()
        use_threads(thread_share(cpus, jobs, config.threads))
        seed_everything(config.seed)
        set_determinism(config.deterministic)
        device = resolve_device(config.device)
        check_executor(config)
        check_images(config, device)
        results.environment = environment(device, overrides, cpus, jobs)
        resumed = None
        if resume:
            plan = plan_resume(job.run_dir, results.config, config, sweep is not None)
            if plan.finished is not None:
                return plan.finished
            resumed, previous_total = plan.checkpoint, plan.previous_total
        owned = True
        for stale in [*remove_stale_temporaries(job.run_dir),
                      *remove_stale_temporaries(checkpoint.folder(job.run_dir))]:
            log.info("Removed %s, left by an interrupted write", stale)
        write_hydra_files(cfg, job.run_dir)
        trackers = build_trackers(config.logger, job, results.config,
                                  resume=resume_point(resumed) if resumed else None,
                                  run_id=resumed.get("tracker_run_id") if resumed else None)

        tic = time.perf_counter()
        dataset = load_dataset(config.dataset, config.cache_dir,
                               min_seconds=min_clip_seconds(config.audio_encoder))
        partition = build_partition(dataset, config.dataset, config.federation, config.seed)
        results.timings["data_s"] = time.perf_counter() - tic
        results.environment["dataset_fingerprint"] = dataset_fingerprint(dataset)
        log.info("Dataset %s: %d clips, %d classes\n%s", dataset.root, len(dataset.clips),
                 len(dataset.class_names), partition.table())

        tic = time.perf_counter()
        embeddings = encode_dataset(config, dataset)
        results.timings["embedding_s"] = time.perf_counter() - tic
        results.embeddings = embeddings.summary()
        log.info("Embeddings: audio %s (%s), text %s (%s) in %.2f s",
                 list(embeddings.audio.shape),
                 "cached" if embeddings.audio_cached else "computed",
                 list(embeddings.text.pooled.shape),
                 "cached" if embeddings.text_cached else "computed",
                 results.timings["embedding_s"])

        stats = {**partition.stats(), "skipped_files": len(dataset.skipped),
                 "short_clips": len(dataset.short)}
        results.partition = {
            **stats,
            "dataset_root": str(dataset.root),
            "skipped": dataset.skipped,
            "short": dataset.short,
            "nodes": [{"node": n.node, "classes": n.classes, **n.counts(),
                       "files": {s: files[s] for s in ("train", "val", "test")}}
                      for n, files in zip(partition.nodes, partition.files(), strict=True)],
        }
        results.warnings = (partition.warnings()
                            + (partition.unscored() if config.generator.enabled else [])
                            + unguarded_warnings(config, stats["val_clips"]))
        for warning in results.warnings:
            log.warning("%s", warning)
        scalars = {f"partition/{k}": v for k, v in stats.items()}
        results.rounds = [{"round": 0, **scalars}]
        if resumed is None:
            trackers.log(scalars, step=0)

        check_class_groups(config, partition)
        shared = shared_tensors(config, dataset, partition, embeddings, device)
        server = ServerA2V(config, build_clients(partition, config.federation.algorithm, device),
                           shared, trackers, job.run_dir,
                           {"config": results.config, "tracker_run_id": trackers.run_id})
        start = 0
        if config.generator.load_from and resumed is None:
            server.generator_rounds.load_generators(config.generator.load_from,
                                                   results.config)
        if resumed is not None:
            server.load_state_dict(resumed["server"])
            server.history = list(resumed["history"])
            server.rounds_seconds = float(resumed["rounds_s"])
            checkpoint.restore_rng(resumed["rng"])
            start = resumed["round"]
        history = server.run(start)
        results.timings["rounds_s"] = server.rounds_seconds
        results.timings["generator_train_s"] = server.generator_rounds.seconds
        results.generator_epochs = server.generator_rounds.epoch_history
        results.summarize(history)
        save_plots(results, job.run_dir / "plots")
        report = server.final_report(dataset.class_names)
        if report is not None:
            results.per_class, matrix = report
            png = save_confusion_png(matrix, list(results.per_class), job.run_dir /
                                     "confusion_matrix.png")
            trackers.log_image("global/confusion_matrix", png, step=config.federation.rounds)
            log.info("Per-class accuracy of the global adapter:\n%s", "\n".join(
                f"  {name:<28} {acc:6.3f}" for name, acc in results.per_class.items()))
        if server.quality is not None and server.quality.per_class:
            save_generator_quality(server.quality, results, job.run_dir, trackers,
                                   config.federation.rounds)
        log.info("Final: %s", ", ".join(f"{k}={results.final[k]:.4g}" for k in HEADLINE
                                        if k in results.final))
        results.status = "completed"
        if not config.checkpoint.keep_on_complete:
            checkpoint.remove_all(job.run_dir)
        return results.to_dict()
    except KeyboardInterrupt as err:
        results.status = "interrupted"
        completed = server.completed_round if server is not None else 0
        if server is not None:
            results.summarize(server.history)
        message = interrupt_message(job.run_dir, completed, overrides, sweep)
        results.error = f"interrupted ({str(err) or 'Ctrl-C'}): {message}"
        raise RunInterrupted(message) from None
    except BaseException as err:
        results.status = "failed"
        results.error = f"{type(err).__name__}: {err}"
        log.debug("Run failed:\n%s", traceback.format_exc())
        raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)
        results.timings["total_s"] = previous_total + time.perf_counter() - started
        try:
            if server is not None:
                server.executor.close()
            if trackers is not None:
                trackers.finish(failed=results.status != "completed")
        finally:
            if owned:
                write_json(job.run_dir / "results.json", results.to_dict())
                log.info("Results (%s) in %s", results.status, job.run_dir / "results.json")


def run_job(cfg: DictConfig) -> None:
    """``main.py``'s job: one line on stderr for bad input (exit 1) or an interrupt (exit 130).
    In a sweep (``-m``) a failed job logs its line and returns, so the other jobs still run;
    :class:`flcore.sweep.SweepReport` lists the failures at the end and exits non-zero. Every
    job ends with its trackers finished and the CUDA cache emptied, for the next job of a
    launcher that reuses its worker processes (joblib)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    sweeping = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        run(cfg)
    except RunInterrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        raise SystemExit(130) from None
    except FedA2VError as err:
        if not sweeping:
            raise SystemExit(f"error: {err}") from None
        log.error("error: %s", err)
    except Exception as err:
        if not sweeping:
            raise
        log.exception("job failed with %s: %s", type(err).__name__, err)
    finally:
        # Hydra's joblib launcher runs the next job in this worker process: leave it no open
        # wandb run and no cached GPU memory.
        import gc

        from flcore.tracking import finish_open_runs

        finish_open_runs()
        gc.collect()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
