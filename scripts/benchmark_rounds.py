"""Round time, framework overhead per client and memory for 10, 100 and 1000 nodes.

    python scripts/benchmark_rounds.py [--nodes 10 100 1000] [--rounds 6]

Clients hold generated embeddings (8 clips of 4 x 32 tokens each, 10 classes) and train a small
adapter (hidden 16, text size 16) for one local epoch of one minibatch per round. Pure compute is
the same local training written as a bare loop (load weights, AdamW, forward, backward,
gradient clipping, step, copy of the weights);
overhead per client = (round time - pure compute) / clients: selection, the client call, state
copies, aggregation, progress bars, logging. Idle memory is the growth of the process's resident
set when the clients are built. Round and compute times are the minimum over the rounds
(the last round also evaluates and is left out) and as many bare loops. Quote ratios from one
run: the machine is shared.
"""

import argparse
import resource
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from omegaconf import OmegaConf

from flcore.clients.clientA2V import ClientA2V
from flcore.clients.clientbase import SharedTensors
from flcore.config import Config
from flcore.servers.serverA2V import ServerA2V
from flcore.tracking import Trackers
from flcore.trainmodel.adapters import AudioAdapter

CLIPS, TOKENS, AUDIO_DIM, TEXT_DIM, CLASSES = 8, 4, 32, 16, 10


def rss_bytes() -> int:
    """Current resident set size (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def bench_config(rounds: int) -> Config:
    config: Config = OmegaConf.to_object(OmegaConf.structured(Config))  # type: ignore[assignment]
    config.federation.rounds = rounds
    config.federation.local_epochs = 1
    config.federation.eval_every = rounds
    config.checkpoint.every = rounds
    config.adapter.hidden_dim = 16
    config.adapter.batch_size = CLIPS
    config.adapter.dropout = 0.0
    config.generator.enabled = False
    return config


def shared_tensors(nodes: int) -> SharedTensors:
    torch.manual_seed(0)
    labels = torch.randint(0, CLASSES, (nodes * CLIPS,))
    tokens = torch.randn(nodes * CLIPS, TOKENS, AUDIO_DIM)
    return SharedTensors(tokens, labels, torch.randn(CLASSES, TEXT_DIM), torch.arange(CLASSES),
                         [f"class_{c}" for c in range(CLASSES)])


def build_clients(nodes: int) -> list[ClientA2V]:
    empty = torch.zeros(0, dtype=torch.long)
    return [ClientA2V(n, [], torch.arange(n * CLIPS, (n + 1) * CLIPS), empty,
                      torch.arange(n * CLIPS, (n + 1) * CLIPS)) for n in range(nodes)]


def pure_compute(shared: SharedTensors, clients: list[ClientA2V], config: Config) -> float:
    """Seconds for the clients' local steps alone, as a bare loop."""
    model = AudioAdapter(AUDIO_DIM, TEXT_DIM, config.adapter)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    tic = time.perf_counter()
    for client in clients:
        model.load_state_dict(start)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.adapter.lr)
        x, y = shared.tokens[client.train_idx], shared.labels[client.train_idx]
        loss = torch.nn.functional.mse_loss(model.embed(x), shared.prompts[y])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.adapter.grad_clip)
        optimizer.step()
        {k: v.detach().clone() for k, v in model.state_dict().items()}
    return time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'nodes':>6} {'round s':>9} {'compute s':>10} {'overhead ms/client':>19} "
          f"{'idle KB/client':>15} {'peak RSS MB':>12}")
    for nodes in args.nodes:
        config = bench_config(args.rounds)
        shared = shared_tensors(nodes)
        before = rss_bytes()
        clients = build_clients(nodes)
        idle = (rss_bytes() - before) / nodes
        with TemporaryDirectory() as run_dir:
            server = ServerA2V(config, clients, shared, Trackers([]), Path(run_dir), {})
            history = server.run()
        round_s = min(r["time/round_s"] for r in history[:-1])
        compute_s = min(pure_compute(shared, clients, config) for _ in range(args.rounds - 1))
        overhead_ms = (round_s - compute_s) / nodes * 1000
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{nodes:>6} {round_s:>9.3f} {compute_s:>10.3f} {overhead_ms:>19.3f} "
              f"{idle / 1024:>15.1f} {peak_mb:>12.0f}")


if __name__ == "__main__":
    main()
