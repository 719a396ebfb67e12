"""Hydra's view of the schema: ``base_config`` in the ConfigStore, and the resolver behind the
default of ``server.adapter_training``."""

from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from flcore.choices import AdapterTraining, Algorithm
from flcore.config.schema import Config


def default_adapter_training(generators: bool, algorithm: Any) -> AdapterTraining:
    """``fedavg+synthetic`` when there are synthetic samples and a global adapter to fine-tune on
    them, else ``fedavg``: so ``generator=none`` and ``federation.algorithm=local|centralized``
    run without also naming server.adapter_training, while an explicit value still wins."""
    federated = Algorithm(algorithm) is Algorithm.federated
    return AdapterTraining.fedavg_synthetic if generators and federated else AdapterTraining.fedavg


def register_configs() -> None:
    """Register the schema that ``configs/config.yaml`` extends (its first defaults entry).

    ``generator.class_groups`` holds user data, so it is not in struct mode: Hydra merges a
    ``generator.class_groups={tonal:[a,b]}`` override into it, which struct mode would refuse
    (new keys) unless written as ``+generator.class_groups=...``."""
    schema = OmegaConf.structured(Config)
    OmegaConf.set_struct(schema.generator.class_groups, False)
    ConfigStore.instance().store(name="base_config", node=schema)
