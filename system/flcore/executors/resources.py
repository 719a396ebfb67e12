"""What the executor asks of this machine, checked before any data is read."""

import importlib.util

import torch

from flcore.config import Config, ExecutorName
from flcore.errors import ConfigError, ResourceError


def check_executor(config: Config) -> None:
    """Refuse, before any data is read, ``executor=ray`` without Ray installed (it is the
    ``ray`` extra) and an executor that asks for GPUs this machine lacks (a cluster's GPUs are
    checked when the Ray executor joins it)."""
    x = config.executor
    if x.name is ExecutorName.ray and importlib.util.find_spec("ray") is None:
        raise ConfigError("executor=ray: Ray is not installed; pip install -e \".[ray]\" (or "
                          "use executor=batched, which needs nothing more)")
    if (x.name is ExecutorName.ray and x.num_gpus > 0 and x.address is None
            and not torch.cuda.is_available()):
        raise ResourceError(f"executor.num_gpus={x.num_gpus:g}: this machine has no CUDA GPU; "
                            "set executor.num_gpus=0, or point executor.address at a Ray "
                            "cluster with GPUs")
