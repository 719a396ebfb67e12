"""How separable the bundled synthetic classes are: probes on mean-pooled YAMNet embeddings.

Generates the set (``--small`` for ``dataset=synthetic_small``) into ``--cache`` if absent, embeds
every clip, and prints the test-fold accuracy of a nearest-class-centroid probe and of a linear
probe (cross-entropy, Adam) trained on folds 1-3:

    python scripts/probe_synthetic.py --cache /tmp/probe-cache
"""

import argparse
from pathlib import Path

import torch

from flcore.config import AudioEncoderConfig, SyntheticConfig
from flcore.data import synthetic
from flcore.data.esc50 import load_esc50, load_waveform
from flcore.encoders.audio import build_audio_encoder

SMALL = SyntheticConfig(clips_per_class=40, clips_per_source=1, fold_weights=[1, 1, 1, 1, 1],
                        duration_s=5.0, snr_db=[8.0, 30.0], background_db=[], room=False)


def pooled_embeddings(root: Path, cache: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean-pooled YAMNet embeddings ``[N, 1024]``, labels and folds of the set in ``root``."""
    dataset = load_esc50(root)
    encoder = build_audio_encoder(AudioEncoderConfig(), cache / "models")
    waves = [load_waveform(dataset.path(c), encoder.sample_rate) for c in dataset.clips]
    tokens = torch.cat([encoder.encode(waves[i : i + 32]) for i in range(0, len(waves), 32)])
    return tokens.mean(1), torch.from_numpy(dataset.labels), torch.from_numpy(dataset.folds)


def probe_accuracies(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor,
                     test: torch.Tensor) -> tuple[float, float]:
    """Test accuracy of a nearest-centroid and of a linear probe on standardised features."""
    z = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
    classes = int(y.max()) + 1
    centroids = torch.stack([z[train & (y == k)].mean(0) for k in range(classes)])
    centroid = (torch.cdist(z[test], centroids).argmin(1) == y[test]).float().mean().item()
    torch.manual_seed(0)
    linear = torch.nn.Linear(z.shape[1], classes)
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-3, weight_decay=1e-3)
    for _ in range(300):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(linear(z[train]), y[train]).backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = (linear(z[test]).argmax(1) == y[test]).float().mean().item()
    return centroid, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, required=True, help="cache folder for data, model")
    parser.add_argument("--small", action="store_true", help="the dataset=synthetic_small set")
    args = parser.parse_args()
    root = synthetic.ensure_dataset(args.cache, SMALL if args.small else SyntheticConfig())
    x, y, folds = pooled_embeddings(root, args.cache)
    centroid, linear = probe_accuracies(x, y, folds <= 3, folds == 5)
    print(f"{root.name}: {int((folds == 5).sum())} test clips; nearest centroid {centroid:.3f}, "
          f"linear probe {linear:.3f} (chance {1 / (int(y.max()) + 1):.3f})")


if __name__ == "__main__":
    main()
