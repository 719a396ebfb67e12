"""Wall time of every generator metric, per class and pooled, at ESC-50 scale.

    python scripts/benchmark_metrics.py [--device cpu] [--classes 50] [--real 40] [--train 40]
        [--generated 200] [--dim 4096] [--permutations 100]

Random rows stand in for embeddings: per class, ``--real`` held-out rows, ``--train`` training
rows and ``--generated`` generated rows of ``--dim`` dimensions, plus one VAE posterior (means and
log-variances ``[train, 64]``) per class. Times :func:`generator_report` (k = 5, MMD² permutation
test, pooled sets capped at its default ``max_rows``) and :func:`latent_usage` for every class,
and prints the seconds.
"""

import argparse
import time

import torch

from flcore.metrics.generative import generator_report, latent_usage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--real", type=int, default=40)
    parser.add_argument("--train", type=int, default=40)
    parser.add_argument("--generated", type=int, default=200)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--permutations", type=int, default=100)
    args = parser.parse_args()
    device = torch.device(args.device)
    rng = torch.Generator().manual_seed(0)

    def draw(n: int, shift: float) -> torch.Tensor:
        return (torch.randn(n, args.dim, generator=rng) + shift).to(device)

    names = [f"class{c}" for c in range(args.classes)]
    real = {name: draw(args.real, c) for c, name in enumerate(names)}
    train = {name: draw(args.train, c) for c, name in enumerate(names)}
    generated = {name: draw(args.generated, c + 0.1) for c, name in enumerate(names)}
    mu = {name: torch.randn(args.train, 64, generator=rng).to(device) for name in names}
    logvar = {name: torch.randn(args.train, 64, generator=rng).to(device) for name in names}

    start = time.perf_counter()
    report = generator_report(real, generated, train, where="benchmark", k=5,
                              permutations=args.permutations)
    for name in names:
        latent_usage(mu[name], logvar[name], where=f"benchmark, class {name}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    print(f"{args.classes} classes x ({args.real} real, {args.train} train, {args.generated} "
          f"generated) x {args.dim} dims on {device}: {seconds:.2f} s")
    print("pooled:", {key: round(value, 4) for key, value in report["pooled"].items()
                      if value is not None})


if __name__ == "__main__":
    main()
