"""docs/experiments.md's commands run as written; the experiments compose as described."""

import json
import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig

from flcore.config import Granularity, validate
from flcore.run import run

DOC = Path(__file__).parents[1] / "docs" / "experiments.md"
# Appended to each documented command: one round, no tracker, the encoder that needs no weights.
ONE_ROUND = ("federation.rounds=1", "logger=none", "audio_encoder=mfcc")


def documented_commands(heading: str) -> list[list[str]]:
    """The overrides of each ``python main.py`` line in the first bash block under ``heading``."""
    section = DOC.read_text().split(f"\n{heading}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert block is not None, f"no bash block under {heading} in {DOC}"
    commands = [shlex.split(line, comments=True) for line in block.group(1).splitlines()]
    for words in commands:
        assert words[:2] == ["python", "main.py"], words
    return [words[2:] for words in commands if words]


REFERENCE_POINTS = documented_commands("## Reference points")


def test_reference_points_are_listed() -> None:
    assert len(REFERENCE_POINTS) >= 5
    assert ["generator=none"] in REFERENCE_POINTS
    assert not any(w.startswith("+experiment=") for words in REFERENCE_POINTS for w in words)


@pytest.mark.parametrize("overrides", REFERENCE_POINTS, ids=" ".join)
def test_reference_point_runs_as_written(make_config: Callable[..., DictConfig], tmp_path: Path,
                                         overrides: list[str]) -> None:
    cfg = make_config(*overrides, *ONE_ROUND)
    config = validate(cfg)
    results = run(cfg, run_dir=tmp_path / "run")
    assert results["status"] == "completed"
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["config"]["server"]["adapter_training"] == config.server.adapter_training
    final = results["final"]
    assert "global/acc" in final
    # The Gaussian floor is fitted in closed form: no training epochs to log.
    vae = config.generator.enabled and config.generator.model.value == "vae"
    for family, expected in (("synthetic/", config.generator.enabled), ("generator/", vae)):
        has = any(k.startswith(family) for k in final)
        assert has == expected, (family, sorted(final))


@pytest.mark.parametrize(("overrides", "adapter_training"), [
    ([], "fedavg+synthetic"),
    (["generator=none"], "fedavg"),
    (["generator.enabled=false"], "fedavg"),
    (["federation.algorithm=local"], "fedavg"),
    (["federation.algorithm=centralized"], "fedavg"),
    (["generator=none", "server.adapter_training=fedavg"], "fedavg"),
    (["server.adapter_training=kd"], "kd"),
])
def test_adapter_training_follows_the_generators(make_config: Callable[..., DictConfig],
                                                 overrides: list[str],
                                                 adapter_training: str) -> None:
    assert validate(make_config(*overrides)).server.adapter_training == adapter_training


def test_generator_none_results_name_the_concrete_training(
        make_config: Callable[..., DictConfig], tmp_path: Path) -> None:
    run(make_config("generator=none", *ONE_ROUND), run_dir=tmp_path)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["config"]["server"]["adapter_training"] == "fedavg"
    assert not any(k.startswith(("synthetic/", "generator/")) for k in written["final"])


def test_esc50_fedavg_is_plain_fedavg(make_config: Callable[..., DictConfig]) -> None:
    config = validate(make_config("+experiment=esc50_fedavg", "dataset.root=/data/ESC-50"))
    assert config.generator.enabled is False
    assert config.server.adapter_training == "fedavg"


@pytest.mark.parametrize(("experiment", "granularity"), [
    ("esc50_perclass", Granularity.per_class),
    ("esc50_unified", Granularity.unified),
    ("esc50_pergroup", Granularity.per_group),
])
def test_esc50_generator_experiments_keep_generators_and_synthetic_training(
        make_config: Callable[..., DictConfig], experiment: str,
        granularity: Granularity) -> None:
    config = validate(make_config(f"+experiment={experiment}", "dataset.root=/data/ESC-50"))
    assert config.generator.enabled is True
    assert config.generator.granularity is granularity
    assert config.server.adapter_training == "fedavg+synthetic"
    assert config.federation.rounds == 20
