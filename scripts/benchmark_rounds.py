"""Round time per executor, framework overhead per client, memory and start-up for 10, 100 and
1000 nodes.

    python scripts/benchmark_rounds.py [--nodes 10 100 1000] [--executors sequential batched ray]
        [--rounds 6] [--clients-per-round N] [--device cpu|cuda] [--hidden 16]

Clients hold generated embeddings (8 clips of 4 x 32 tokens each, 10 classes) and train a small
adapter (hidden 16, text size 16) for one local epoch of one minibatch per round. Each (nodes,
executor) pair runs in a fresh process, so its peak memory is its own. Pure compute is the
sequential local training written as a bare loop (load weights, AdamW, forward, backward,
gradient clipping, step, copy of the weights); sequential overhead per client = (round time -
pure compute) / clients: selection, the client call, state copies, aggregation, progress bars,
logging. Ray's overhead per client is its round time less the in-process batched round time, per
client: what shipping the work to Ray tasks adds. Start-up is the server's construction (with a
local Ray's start). Round and compute times are the minimum over the rounds (the last round also
evaluates and is left out). Quote ratios from one run: the machine is shared.
"""

import argparse
import multiprocessing
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from omegaconf import OmegaConf

from flcore.clients.clientA2V import ClientA2V
from flcore.clients.protocol import SharedTensors
from flcore.config import Config, ExecutorName
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


def shared_tensors(nodes: int, device: torch.device) -> SharedTensors:
    torch.manual_seed(0)
    labels = torch.randint(0, CLASSES, (nodes * CLIPS,))
    tokens = torch.randn(nodes * CLIPS, TOKENS, AUDIO_DIM)
    return SharedTensors(tokens.to(device), labels.to(device),
                         torch.randn(CLASSES, TEXT_DIM).to(device),
                         torch.arange(CLASSES, device=device),
                         [f"class_{c}" for c in range(CLASSES)])


def build_clients(nodes: int, device: torch.device) -> list[ClientA2V]:
    empty = torch.zeros(0, dtype=torch.long, device=device)
    return [ClientA2V(n, [], torch.arange(n * CLIPS, (n + 1) * CLIPS, device=device), empty,
                      torch.arange(n * CLIPS, (n + 1) * CLIPS, device=device))
            for n in range(nodes)]


def pure_compute(shared: SharedTensors, clients: list[ClientA2V], config: Config) -> float:
    """Seconds for the clients' local steps alone, as a bare loop."""
    model = AudioAdapter(AUDIO_DIM, TEXT_DIM, config.adapter).to(shared.tokens.device)
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


def measure(nodes: int, executor: str, rounds: int, per_round: int | None, device: str,
            hidden: int) -> dict[str, float]:
    """One (nodes, executor) pair, in this process: round, compute and start-up seconds, idle
    and peak memory."""
    torch.set_num_threads(1)
    config = bench_config(rounds)
    config.adapter.hidden_dim = hidden
    config.executor.name = ExecutorName(executor)
    config.executor.clients_per_batch = nodes
    config.federation.clients_per_round = per_round
    config.device = device
    shared = shared_tensors(nodes, torch.device(device))
    before = rss_bytes()
    clients = build_clients(nodes, torch.device(device))
    idle = (rss_bytes() - before) / nodes
    with TemporaryDirectory() as run_dir:
        tic = time.perf_counter()
        server = ServerA2V(config, clients, shared, Trackers([]), Path(run_dir), {})
        startup = time.perf_counter() - tic
        try:
            history = server.run()
        finally:
            server.executor.close()
    selected = server.per_round
    compute = min(pure_compute(shared, clients[:selected], config) for _ in range(rounds - 1))
    return {"round_s": min(r["time/round_s"] for r in history[:-1]), "compute_s": compute,
            "clients": selected, "startup_s": startup, "idle_kb": idle / 1024,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--executors", nargs="+", default=["sequential", "batched", "ray"],
                        choices=[e.value for e in ExecutorName])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--clients-per-round", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=16)
    args = parser.parse_args()
    print(f"{'nodes':>6} {'executor':>10} {'round s':>9} {'vs seq':>7} {'overhead ms/client':>19} "
          f"{'start-up s':>10} {'idle KB/client':>15} {'peak RSS MB':>12}")
    spawn = multiprocessing.get_context("spawn")
    for nodes in args.nodes:
        rows: dict[str, dict[str, float]] = {}
        for executor in args.executors:
            with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                rows[executor] = pool.submit(measure, nodes, executor, args.rounds,
                                             args.clients_per_round, args.device,
                                             args.hidden).result()
            r = rows[executor]
            if executor == "sequential":
                overhead = (r["round_s"] - r["compute_s"]) / r["clients"] * 1000
            elif executor == "ray" and "batched" in rows:
                overhead = (r["round_s"] - rows["batched"]["round_s"]) / r["clients"] * 1000
            else:
                overhead = float("nan")
            speedup = (rows["sequential"]["round_s"] / r["round_s"] if "sequential" in rows
                       else float("nan"))
            print(f"{nodes:>6} {executor:>10} {r['round_s']:>9.3f} {speedup:>6.1f}x "
                  f"{overhead:>19.3f} {r['startup_s']:>10.2f} {r['idle_kb']:>15.1f} "
                  f"{r['peak_mb']:>12.0f}", flush=True)


if __name__ == "__main__":
    main()
