"""Batched per-class generators against a Python loop over classes, and against the upstream
one-sample-at-a-time loop.

    python scripts/benchmark_generators.py [--device cuda] [--classes 50] [--epochs 10]
    python scripts/benchmark_generators.py --nodes 8 --classes 10 [--device cuda]

50 per-class VAEs, 32 samples each of 4 x 1024 inputs, 10 epochs, batch 32, the configured VAE
loss (linear beta warm-up), gradient clipping 1.0, Adam:
  (a) batched: one module with stacked weights, batched matmuls, one masked Adam step;
  (b) loop: one VAE per class in a Python loop, minibatches, torch Adam;
  (c) upstream: the same loop with one sample per step.
Prints wall times, the ratios and each method's final mean loss. (a) and (b) start from the same
weights and noise, so their losses agree to float tolerance; (c) takes 32x more steps.

With ``--nodes N``: N nodes, each with a bank of ``--classes`` per-class generators (the
configured epochs and batch), trained
  (a) as one bank: all nodes' banks stacked into one model (``fit_together``);
  (b) one bank per node, in a loop (``GeneratorBank.fit``);
  (c) the class loop of each node (one VAE per class, torch Adam).
(a) and (b) start from the same weights and noise, so their losses agree to float tolerance.
"""

import argparse
import copy
import dataclasses
import time

import torch

from flcore.config import DecoderVariance, GeneratorConfig
from flcore.trainmodel.bank_training import (
    GeneratorData,
    bank_optimizer,
    learning_rates,
    train_generators,
)
from flcore.trainmodel.banks import fit_together
from flcore.trainmodel.generators import GeneratorBank, GeneratorSpec
from flcore.trainmodel.vae import VAEGenerator, VAELoss, vae_loss


def learned(config: GeneratorConfig) -> bool:
    """Whether the configured decoders learn their variance (``decoder_variance=learned``)."""
    return config.decoder_variance is DecoderVariance.learned


def epochs_loss(config: GeneratorConfig, epochs: int) -> VAELoss:
    """The configured loss, its beta schedule ``epochs`` long (one training of a run)."""
    return vae_loss(dataclasses.replace(config, training_epochs=epochs), rounds=1, round_=1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batched(init: dict, data: GeneratorData, config: GeneratorConfig, epochs: int,
            batch: int, device: torch.device) -> float:
    k, features = data.x.shape[0], data.x.shape[-1]
    model = VAEGenerator(k, features, config.hidden_dim, config.latent_dim,
                         learned_variance=learned(config)).to(device)
    model.load_state_dict(init)
    optimizer = bank_optimizer(model, config)
    rngs = [torch.Generator(device=device).manual_seed(g) for g in range(k)]
    logs = train_generators(model, optimizer, epochs_loss(config, epochs), data, epochs, batch,
                            config.grad_clip, rngs)
    sync(device)
    return float(logs[-1].total.mean())


def loop(init: dict, data: GeneratorData, config: GeneratorConfig, epochs: int, batch: int,
         device: torch.device) -> float:
    """One VAE per class, trained in turn (torch Adam, ``clip_grad_norm_``)."""
    k, features = data.x.shape[0], data.x.shape[-1]
    loss_fn = epochs_loss(config, epochs)
    finals = []
    for g in range(k):
        model = VAEGenerator(1, features, config.hidden_dim, config.latent_dim,
                             learned_variance=learned(config)).to(device)
        model.load_state_dict({name: v[g : g + 1] for name, v in init.items()})
        optimizer = torch.optim.Adam([{"params": [p], "lr": lr} for p, lr in zip(
            model.parameters(), learning_rates(model, config), strict=True)])
        rng = torch.Generator(device=device).manual_seed(g)
        x = data.x[g : g + 1]
        n = int(data.counts[g])
        for epoch in range(epochs):
            order = torch.randperm(n, generator=rng, device=device)
            total, seen = 0.0, 0
            for start in range(0, n, batch):
                idx = order[start : start + batch]
                xb = x[:, idx]
                noise = torch.randn(len(idx), config.latent_dim, generator=rng,
                                    device=device)[None]
                recon, mu, logvar = model(xb, noise)
                terms = loss_fn(recon, xb, mu, logvar, epoch,
                                torch.ones(1, len(idx), dtype=torch.bool, device=device),
                                model.dec_logvar)
                optimizer.zero_grad()
                terms.total.sum().backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                total += float(terms.total.detach()) * len(idx)
                seen += len(idx)
        finals.append(total / seen)
    sync(device)
    return sum(finals) / len(finals)


def node_banks(nodes: int, classes: int, samples: int, features: int, config: GeneratorConfig,
               device: torch.device
               ) -> tuple[list[GeneratorBank], list[torch.Tensor], list[torch.Tensor]]:
    """``nodes`` banks of ``classes`` per-class generators, and each node's rows and labels
    (``samples`` rows of each of its classes; node i holds classes ``i * classes ...``)."""
    banks, xs, ys = [], [], []
    for node in range(nodes):
        ids = list(range(node * classes, (node + 1) * classes))
        spec = GeneratorSpec([f"class{c}" for c in ids], [[c] for c in ids])
        banks.append(GeneratorBank(spec, features, config, 0, device))
        xs.append(torch.rand(classes * samples, features, device=device) * 2)
        ys.append(torch.tensor(ids, device=device).repeat_interleave(samples))
    return banks, xs, ys


def bank_rngs(banks: list[GeneratorBank], device: torch.device) -> list[list[torch.Generator]]:
    return [[torch.Generator(device=device).manual_seed(1000 * i + g)
             for g in range(bank.model.k)] for i, bank in enumerate(banks)]


def benchmark_nodes(args: argparse.Namespace, device: torch.device) -> None:
    """(a) all nodes' banks as one, (b) one bank per node, (c) each node's class loop."""
    config = GeneratorConfig(training_epochs=args.epochs, batch_size=args.batch)
    features = 4 * 1024
    torch.manual_seed(0)
    banks, xs, ys = node_banks(args.nodes, args.classes, args.samples, features, config, device)
    loss = vae_loss(config, rounds=1, round_=1)
    wheres = [f"node {i}: " for i in range(args.nodes)]

    def together(fresh: list[GeneratorBank]) -> float:
        logs = fit_together(fresh, xs, ys, [None] * len(fresh), loss, bank_rngs(fresh, device),
                            wheres, max_generators=args.max_generators)
        sync(device)
        return float(torch.cat([node[-1].total for node in logs]).mean())

    def one_by_one(fresh: list[GeneratorBank]) -> float:
        logs = [bank.fit(x, y, None, loss, rngs, where) for bank, x, y, rngs, where
                in zip(fresh, xs, ys, bank_rngs(fresh, device), wheres, strict=True)]
        sync(device)
        return float(torch.cat([node[-1].total for node in logs]).mean())

    def class_loop(fresh: list[GeneratorBank]) -> float:
        finals = [loop({k: v.clone() for k, v in bank.model.state_dict().items()},
                       bank.data(x, y, None), config, args.epochs, args.batch, device)
                  for bank, x, y in zip(fresh, xs, ys, strict=True)]
        return sum(finals) / len(finals)

    methods = {"(a) one bank of all nodes": together, "(b) one bank per node": one_by_one,
               "(c) class loop per node": class_loop}
    warm = copy.deepcopy(banks[0])  # warm-up: one node's bank
    warm.fit(xs[0], ys[0], None, loss, bank_rngs([warm], device)[0], wheres[0])
    times: dict[str, float] = {name: float("inf") for name in methods}
    losses = {}
    for _ in range(args.repeats):  # interleaved; the minimum of each
        for name, method in methods.items():
            fresh = copy.deepcopy(banks)
            tic = time.perf_counter()
            losses[name] = method(fresh)
            times[name] = min(times[name], time.perf_counter() - tic)
    print(f"{args.nodes} nodes x {args.classes} generators x {args.samples} samples of "
          f"{features}, {args.epochs} epochs, batch {args.batch}, max_generators "
          f"{args.max_generators}, device {device}, torch threads {torch.get_num_threads()}")
    base = times["(a) one bank of all nodes"]
    for name in methods:
        print(f"{name:<26} {times[name]:8.2f} s  {times[name] / base:7.2f}x of (a)  "
              f"final loss {losses[name]:.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--skip-upstream", action="store_true", help="skip (c), the slowest")
    parser.add_argument("--nodes", type=int, default=0,
                        help="N > 0: N nodes' banks as one vs one per node vs the class loop")
    parser.add_argument("--repeats", type=int, default=3,
                        help="--nodes: interleaved repetitions; the minimum is reported")
    parser.add_argument("--max-generators", type=int, default=None,
                        help="--nodes: train at most this many generators at once")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.nodes:
        benchmark_nodes(args, device)
        return
    times, losses, features = class_loop(device, args.classes, args.samples, args.epochs,
                                         args.batch, not args.skip_upstream)
    print(f"{args.classes} generators x {args.samples} samples of {features}, {args.epochs} "
          f"epochs, batch {args.batch}, device {device}, torch threads {torch.get_num_threads()}")
    base = times["(a) batched"]
    for name in times:
        print(f"{name:<26} {times[name]:8.2f} s  {times[name] / base:7.2f}x of (a)  "
              f"final loss {losses[name]:.5f}")


def class_loop(device: torch.device | str, classes: int, samples: int, epochs: int, batch: int,
               upstream: bool = False) -> tuple[dict[str, float], dict[str, float], int]:
    """Seconds and final mean loss of (a), (b) and, with ``upstream``, (c) for ``classes``
    default-size generators of ``samples`` rows each (after one warm-up epoch of (a)); and the
    row width."""
    device = torch.device(device)
    config = GeneratorConfig()
    torch.manual_seed(0)
    features = 4 * 1024
    x = torch.rand(classes, samples, features, device=device) * 2
    data = GeneratorData(x, torch.full((classes,), samples))
    init = VAEGenerator(classes, features, config.hidden_dim, config.latent_dim,
                        learned_variance=learned(config)).to(device).state_dict()
    init = {k: v.clone() for k, v in init.items()}
    methods = {"(a) batched": lambda: batched(init, data, config, epochs, batch, device),
               "(b) loop over classes": lambda: loop(init, data, config, epochs, batch, device)}
    if upstream:
        methods["(c) one sample at a time"] = lambda: loop(init, data, config, epochs, 1,
                                                           device)
    batched(init, data, config, 1, batch, device)
    times, losses = {}, {}
    for name, method in methods.items():
        tic = time.perf_counter()
        losses[name] = method()
        times[name] = time.perf_counter() - tic
    return times, losses, features


def class_loop_seconds(device: str, classes: int, samples: int, epochs: int,
                       batch: int) -> tuple[float, float]:
    """Seconds of (a) batched and (b) the class loop (:func:`class_loop`)."""
    times, _, _ = class_loop(device, classes, samples, epochs, batch)
    return times["(a) batched"], times["(b) loop over classes"]


if __name__ == "__main__":
    main()
