"""Shared fixtures: composed configs, a session-wide synthetic dataset and a tiny ESC-50 folder."""

import csv
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

import flcore  # noqa: F401  (registers the schema and resolvers)
from flcore.config import SyntheticConfig
from flcore.data import synthetic

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# A subprocess's timeout guards against a hang, never checks speed: a loaded 2-core machine
# runs these tests many times slower than an idle one.
HANG_GUARD_S = 3600
# Tests run on the small bundled set (80 test clips) unless they pick a dataset: the default
# benchmark (400 test clips) is for results, tests/test_synthetic.py checks its shape.
SMALL_DATASET = "dataset=synthetic_small"

# Overrides the run tests share, so a run takes seconds; each module adds its own keys, in the
# order its runs record them (results.json keeps the overrides as given).
#: MFCC features (no weights), a narrow adapter and a csv log only.
QUICK = ("logger=[csv]", "audio_encoder=mfcc", "adapter.hidden_dim=32")
#: Generators small enough to train in a blink.
TINY_GENERATORS = ("generator.training_epochs=2", "generator.hidden_dim=16",
                   "generator.latent_dim=4")
#: A quick adapter at a higher learning rate, one local epoch a round, no checkpoints.
QUICK_ROUNDS = (*QUICK, "adapter.lr=0.003", "federation.local_epochs=1", "checkpoint.every=0")
#: Adapters alone (no generators), one local epoch a round, a checkpoint every round.
ADAPTERS_ONLY = (*QUICK, "federation.local_epochs=1", "generator=none", "checkpoint.every=1")
#: A wider adapter that learns the small set in a few rounds.
LEARNING = ("logger=[csv]", "audio_encoder=mfcc", "adapter.hidden_dim=64", "adapter.lr=0.003",
            "federation.local_epochs=1")
#: One round with tiny generators and no checkpoints: a sweep's job.
SWEEP_JOB = [*QUICK, "federation.local_epochs=1", "federation.rounds=1", *TINY_GENERATORS,
             "checkpoint.every=0"]


def _experiment_sets_dataset(name: str) -> bool:
    """Whether ``configs/experiment/NAME.yaml`` (or an experiment it builds on) picks a dataset."""
    path = CONFIGS / "experiment" / f"{name}.yaml"
    if not path.is_file():
        return False
    defaults = OmegaConf.load(path).get("defaults", [])
    return any(_experiment_sets_dataset(d) if isinstance(d, str) else "override /dataset" in d
               for d in defaults)


def on_small_dataset(overrides: Sequence[str]) -> list[str]:
    """``overrides`` plus ``dataset=synthetic_small`` (before the first override, so it joins
    their run of positional arguments), unless they pick a dataset themselves (``dataset=...``
    or an experiment that does)."""
    experiments = [o.split("=", 1)[1] for o in overrides if o.startswith("+experiment=")]
    if any(o.startswith("dataset=") for o in overrides) or any(
            map(_experiment_sets_dataset, experiments)):
        return list(overrides)
    first = next((i for i, o in enumerate(overrides) if "=" in o and not o.startswith("-")),
                 len(overrides))
    return [*overrides[:first], SMALL_DATASET, *overrides[first:]]


@pytest.fixture(scope="session")
def small_synthetic() -> SyntheticConfig:
    """The ``dataset=synthetic_small`` set's parameters, as configs/ compose them."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        config = compose("config", overrides=[SMALL_DATASET])
    return SyntheticConfig(**OmegaConf.to_container(config.dataset.synthetic))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory, small_synthetic: SyntheticConfig) -> Path:
    """A cache folder shared by the session, holding the small synthetic dataset."""
    root = tmp_path_factory.mktemp("cache")
    synthetic.ensure_dataset(root, small_synthetic)
    return root


@pytest.fixture
def make_config(cache_dir: Path) -> Callable[..., DictConfig]:
    """Compose ``configs/config.yaml`` with overrides, as ``python main.py`` would (on the small
    set unless the overrides pick a dataset: :func:`on_small_dataset`)."""

    def _compose(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return compose("config", overrides=[f"cache_dir={cache_dir}",
                                                *on_small_dataset(overrides)])

    return _compose


@pytest.fixture
def run_config(make_config: Callable[..., DictConfig],
               tmp_path: Path) -> Callable[..., dict[str, Any]]:
    """Run one job in-process: ``run_config(*overrides, folder="run")`` composes the overrides
    and runs them in ``tmp_path / folder``; modules bind their fast settings with partial."""
    from flcore.run import run

    def _run(*overrides: str, folder: str = "run") -> dict[str, Any]:
        return run(make_config(*overrides), run_dir=tmp_path / folder)

    return _run


def epoch_rows(folder: Path) -> list[dict[str, str]]:
    """The rows of a run's ``generator_metrics.csv``."""
    with open(folder / "generator_metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def run_main(cache_dir: Path, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run ``python main.py ARGS`` (or another ``script``) in a fresh working folder with the
    session cache, on the small set unless the arguments pick one (:func:`on_small_dataset`)."""

    def _run(*args: str, cwd: Path | None = None,
             script: Path = REPO / "main.py") -> subprocess.CompletedProcess:
        env = {**os.environ, "FEDA2V_CACHE_DIR": str(cache_dir), "WANDB_SILENT": "true"}
        env.pop("WANDB_MODE", None)
        return subprocess.run([sys.executable, str(script), *on_small_dataset(args)],
                              cwd=cwd or tmp_path,
                              env=env, capture_output=True, text=True, timeout=HANG_GUARD_S,
                              check=False)

    return _run


def write_esc50(root: Path, rows: list[tuple[str, int, int, str]], rate: int = 44100,
                seconds: float = 1.0, src_file_column: bool = True) -> Path:
    """An ESC-50-layout folder: a noise burst WAV per row (filename, fold, target, category).

    Rows are named ``{fold}-{src_file}-{take}-{target}.wav``; the metadata's ``src_file`` column
    holds the name's second field, or is left out with ``src_file_column=False``.
    """
    (root / "audio").mkdir(parents=True, exist_ok=True)
    (root / "meta").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = ["filename,fold,target,category,esc10" + (",src_file,take" * src_file_column)]
    for filename, fold, target, category in rows:
        audio = 0.1 * rng.standard_normal(int(rate * seconds)).astype(np.float32)
        sf.write(root / "audio" / filename, audio, rate, subtype="PCM_16")
        src = f",{filename.split('-')[1]},A" if src_file_column else ""
        lines.append(f"{filename},{fold},{target},{category},False{src}")
    (root / "meta" / "esc50.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def tiny_esc50(tmp_path: Path) -> Path:
    """Three classes x five folds x two one-second clips, 44.1 kHz like the real ESC-50."""
    rows = [(f"{fold}-{target}{fold}{take}000-A-{target}.wav", fold, target, name)
            for target, name in enumerate(["dog", "rain", "siren"])
            for fold in range(1, 6) for take in range(2)]
    return write_esc50(tmp_path / "ESC-50-master", rows)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` run only where CUDA exists."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def interrupt_in_round(monkeypatch: pytest.MonkeyPatch, round_: int) -> None:
    """Make the server raise Ctrl-C as round ``round_`` starts (the rounds before it are
    checkpointed as the run's settings say)."""
    from flcore.servers.serverA2V import ServerA2V

    train_round = ServerA2V.train_round

    def stopped(self: ServerA2V, number: int, selected: list) -> dict:
        if number == round_:
            raise KeyboardInterrupt
        return train_round(self, number, selected)

    monkeypatch.setattr(ServerA2V, "train_round", stopped)


@pytest.fixture
def float64() -> Iterator[None]:
    """Torch's default dtype float64 for the test (for comparisons to rounding)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
