"""Rendering a saved run without retraining (``scripts/render.py``): the config the run was
trained under with ``images`` overrides, its embeddings from the cache, its adapters from the
latest checkpoint."""

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flcore import checkpoint
from flcore.config import Config, ExecutorName, PipelineName, validate
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


def compose(saved: dict[str, Any], overrides: list[str], configs: Path | None) -> DictConfig:
    """The run's resolved config (as its checkpoint holds it) with ``overrides``: ``key=value``
    pairs, and ``images=NAME`` (the ``configs/images/NAME.yaml`` option) when ``configs``
    is given."""
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"{bad[0]}: overrides are key=value (images.path=/models/sd15)")
    split = [o.split("=", 1) for o in overrides]
    groups = [(k, v) for k, v in split if configs is not None and (configs / k).is_dir()]
    pairs = [f"{k}={v}" for k, v in split if (k, v) not in groups]
    kept = {k: v for k, v in saved.items() if k != "checkpoint"}  # runs saved before keep_last
    layers: list[Any] = [OmegaConf.structured(Config), kept]
    for key, name in groups:
        assert configs is not None
        if key != "images":
            raise ConfigError(f"{key}=...: rendering keeps the run's {key}; only the images "
                              "option and key=value overrides can change")
        option = configs / "images" / f"{name}.yaml"
        if not option.is_file():
            raise ConfigError(f"images={name}: no such option; use one of "
                              f"{', '.join(sorted(p.stem for p in option.parent.glob('*.yaml')))}")
        for part in (configs / "images" / "none.yaml", option):
            layers.append({"images": {k: v for k, v in OmegaConf.to_container(
                OmegaConf.load(part)).items() if k != "defaults"}})
    try:
        return OmegaConf.merge(*layers, OmegaConf.from_dotlist(pairs))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{' '.join(overrides)}: {str(err).splitlines()[0]}") from None


def render_run(run_dir: Path, overrides: list[str],
               configs: Path | None = None) -> dict[str, float]:
    """Render and judge from ``run_dir``'s latest checkpoint; the metrics, also written to
    ``images/round_NNN/metrics.json``. Only ``images.*`` and what a resume may change (device,
    cache, executor) can differ from the run's config."""
    run_dir = Path(run_dir)
    if not checkpoint.checkpoints(run_dir):
        raise ConfigError(f"{run_dir}: no checkpoint in {checkpoint.folder(run_dir)}; rendering "
                          "needs a run saved with checkpoint.every > 0")
    saved = checkpoint.load_latest(run_dir)
    cfg = compose(saved["config"], overrides, configs)
    config = validate(cfg)
    if config.images.pipeline is PipelineName.none:
        raise ConfigError("images.pipeline=none: name the pipeline to render with "
                          "(images=sd images.path=/models/sd15)")
    checkpoint.check_config(saved["config"], resolved_config(cfg))
    config.executor.name = ExecutorName.sequential  # rendering trains nothing
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
        server.load_adapters(saved["server"])
        round_ = int(saved["round"])
        if config.images.nodes and not server.strategy.stateful:
            log.warning("images.nodes: the nodes' adapters of round %d were not saved (only "
                        "federation.algorithm=local keeps them); rendering the global one", round_)
        log.info("Rendering round %d of %s with %s", round_, run_dir, config.images.path)
        metrics = server.render(round_, {})
    finally:
        server.executor.close()
    write_json(run_dir / "images" / f"round_{round_:03d}" / "metrics.json", metrics)
    return metrics
