"""Size on disk of one checkpoint, as the run writes it, for the shapes of the default run and of
``+experiment=esc50_perclass``, with and without optimizer states.

    python scripts/checkpoint_sizes.py

Each row trains one real round (adapters, per-class generators, synthetic samples) on random
embeddings of the experiment's shapes and writes its checkpoint with ``ServerA2V``; sizes do not
depend on the values. Default run: 400 clips (240 train) x 8 tokens x 1024 (YAMNet), 10 classes
on 5 nodes x 2. ESC-50: 2000 clips (1600 train) x 8 x 1024, 50 classes on 5 nodes x 10.
"""

from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from omegaconf import OmegaConf

from flcore import checkpoint
from flcore.clients.clientA2V import ClientA2V
from flcore.clients.protocol import SharedTensors
from flcore.config import Config
from flcore.servers.serverA2V import ServerA2V
from flcore.tracking import Trackers

TOKENS, AUDIO_DIM, TEXT_DIM = 8, 1024, 384


def federation(classes: int, nodes: int, train_per_class: int,
               test_per_class: int) -> tuple[SharedTensors, list[ClientA2V]]:
    """Random embeddings; node n holds classes n*k .. n*k+k-1 (k = classes / nodes)."""
    per_class = train_per_class + test_per_class
    labels = torch.arange(classes).repeat_interleave(per_class)
    shared = SharedTensors(torch.randn(len(labels), TOKENS, AUDIO_DIM), labels,
                           torch.randn(classes, TEXT_DIM), torch.arange(classes),
                           [f"class_{c}" for c in range(classes)])
    k = classes // nodes
    clients = []
    for n in range(nodes):
        rows = torch.arange(n * k * per_class, (n + 1) * k * per_class).reshape(k, per_class)
        clients.append(ClientA2V(n, shared.class_names[n * k:(n + 1) * k],
                                 rows[:, :train_per_class].flatten(), torch.zeros(0).long(),
                                 rows[:, train_per_class:].flatten()))
    return shared, clients


def size_mb(shape: tuple[int, int, int, int], optimizer_state: bool) -> float:
    config: Config = OmegaConf.to_object(OmegaConf.structured(Config))  # type: ignore[assignment]
    config.federation.rounds = 1
    config.federation.local_epochs = 1
    config.generator.training_epochs = 1
    config.checkpoint.optimizer_state = optimizer_state
    shared, clients = federation(*shape)
    with TemporaryDirectory() as run_dir:
        server = ServerA2V(config, clients, shared, Trackers([]), Path(run_dir), {})
        server.run()
        return checkpoint.checkpoints(Path(run_dir))[-1].stat().st_size / 1e6


def main() -> None:
    torch.manual_seed(0)
    shapes = {"default run (10 per-class generators)": (10, 5, 24, 16),
              "esc50_perclass (50 per-class generators)": (50, 5, 32, 8)}
    print(f"{'shapes':<42} {'with optimizer MB':>18} {'without MB':>11}")
    for name, shape in shapes.items():
        print(f"{name:<42} {size_mb(shape, True):>18.1f} {size_mb(shape, False):>11.1f}")


if __name__ == "__main__":
    main()
