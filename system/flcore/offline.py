"""Rendering a saved run without retraining (``scripts/render.py``): the run's config with
``images.*`` overrides, its embeddings from the cache, its adapters from the latest checkpoint."""

import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flcore import checkpoint
from flcore.config import Config, PipelineName, validate
from flcore.data import load_dataset
from flcore.data.embeddings import encode_dataset
from flcore.data.partition import build_partition
from flcore.encoders.audio import min_clip_seconds
from flcore.errors import ConfigError
from flcore.files import write_json
from flcore.run import build_clients, resolved_config, shared_tensors
from flcore.runtime import resolve_device, seed_everything
from flcore.servers.serverA2V import ServerA2V
from flcore.tracking import Trackers
from flcore.visual.renderer import check_images

log = logging.getLogger(__name__)


def run_config(run_dir: Path, overrides: list[str]) -> Any:
    """The run's composed config (``.hydra/config.yaml``) with ``key=value`` overrides."""
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"{run_dir}: no .hydra/config.yaml; pass the folder of a FedA2V run")
    groups = [o for o in overrides if "=" in o and "." not in o.split("=", 1)[0]]
    if groups:
        raise ConfigError(f"{groups[0]}: scripts/render.py takes key=value overrides of the "
                          "run's config (images.pipeline=sd images.path=...), not config groups")
    try:
        return OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(saved),
                               OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as err:
        raise ConfigError(f"scripts/render.py overrides {' '.join(overrides)}: "
                          f"{str(err).splitlines()[0]}") from None


def render_run(run_dir: Path, overrides: list[str]) -> dict[str, float]:
    """Render and judge from ``run_dir``'s latest checkpoint; the metrics, also written to
    ``images/round_NNN/metrics.json``. Only ``images.*`` (and what a resume may change) can
    differ from the run's config."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir, overrides)
    config = validate(cfg)
    if config.images.pipeline is PipelineName.none:
        raise ConfigError("images.pipeline=none: name the pipeline to render with "
                          "(images.pipeline=sd images.path=/models/sd15)")
    saved = checkpoint.load_latest(run_dir)
    checkpoint.check_config(saved["config"], resolved_config(cfg))
    seed_everything(config.seed)
    device = resolve_device(config.device)
    check_images(config, device)
    dataset = load_dataset(config.dataset, config.cache_dir,
                           min_seconds=min_clip_seconds(config.audio_encoder))
    partition = build_partition(dataset, config.dataset, config.federation, config.seed)
    shared = shared_tensors(config, dataset, partition, encode_dataset(config, dataset), device)
    server = ServerA2V(config, build_clients(partition, config.federation.algorithm, device),
                       shared, Trackers([]), run_dir, {})
    try:
        server.load_state_dict(saved["server"])
        round_ = int(saved["round"])
        log.info("Rendering round %d of %s with %s", round_, run_dir, config.images.path)
        metrics = server.render(round_, {})
    finally:
        server.executor.close()
    write_json(run_dir / "images" / f"round_{round_:03d}" / "metrics.json", metrics)
    return metrics
