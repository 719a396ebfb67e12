"""FedA2V: federated audio-to-visual learning, simulated. Entry point: :func:`flcore.run.run`."""

import os
import secrets

from omegaconf import OmegaConf

from flcore.config import default_adapter_training, register_configs
from flcore.errors import ConfigError, DataError, FedA2VError

__all__ = ["ConfigError", "DataError", "FedA2VError"]
__version__ = "0.1.0"

_PROCESS_ID = f"{os.getpid()}{secrets.token_hex(2)}"

OmegaConf.register_new_resolver("feda2v.process_id", lambda: _PROCESS_ID, replace=True)
OmegaConf.register_new_resolver("feda2v.default_adapter_training", default_adapter_training,
                                replace=True)
register_configs()
