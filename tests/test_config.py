"""Config composition, schema enforcement and range checks (all before any work)."""

from collections.abc import Callable
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig

from flcore.config import Config, Granularity, validate
from flcore.errors import ConfigError

EXPERIMENT_DIR = Path(__file__).parents[1] / "configs" / "experiment"
EXPERIMENTS = sorted(p.stem for p in EXPERIMENT_DIR.glob("*.yaml"))


def test_default_config_validates(make_config: Callable[..., DictConfig]) -> None:
    config = validate(make_config())
    assert isinstance(config, Config)
    assert config.dataset.name.value == "synthetic"
    assert config.federation.partition.num_nodes == 5
    assert config.generator.granularity is Granularity.per_class
    assert config.logger.csv is not None and config.logger.wandb is not None


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(make_config: Callable[..., DictConfig], experiment: str,
                                   tmp_path: Path) -> None:
    config = validate(make_config(f"+experiment={experiment}", f"dataset.root={tmp_path}"))
    assert config.name == experiment


def test_esc50_experiment_uses_the_five_categories(make_config: Callable[..., DictConfig]) -> None:
    config = validate(make_config("+experiment=esc50_perclass", "dataset.root=/data/ESC-50"))
    assert config.federation.nodes is not None
    assert [len(n.classes) for n in config.federation.nodes] == [10] * 5
    assert len({c for n in config.federation.nodes for c in n.classes}) == 50
    assert config.dataset.train_folds == [1, 2, 3, 4] and config.dataset.test_folds == [5]


def test_logger_selection_is_a_list(make_config: Callable[..., DictConfig]) -> None:
    assert validate(make_config("logger=[csv]")).logger.wandb is None
    none = validate(make_config("logger=none")).logger
    assert none.csv is None and none.wandb is None


@pytest.mark.parametrize(("overrides", "message"), [
    (["generator.beta_warmup_ratio=1.5"], "generator.beta_warmup_ratio=1.5: must be in (0, 1]"),
    (["generator.beta_warmup_ratio=0"], "generator.beta_warmup_ratio=0.0: must be in (0, 1]"),
    (["generator.training_epochs=0"], "generator.training_epochs=0: must be >= 1"),
    (["generator.beta_max=-1"], "generator.beta_max=-1.0: must be > 0"),
    (["generator.granularity=per_group"], "generator.class_groups={}: generator.granularity="
                                          "per_group needs groups"),
    (["+generator.class_groups={a:[dog,cat],b:[cat]}"], "class 'cat' is already in group 'a'"),
    (["generator.synthetic_samples_per_class=0"],
     "generator.synthetic_samples_per_class=0: must be a positive integer or auto"),
    (["generator.synthetic_samples_per_class=some"],
     "generator.synthetic_samples_per_class=some: must be a positive integer or auto"),
    (["server.adapter_training=fedprox"], "server.adapter_training=fedprox: must be one of"),
    (["federation.algorithm=local", "server.adapter_training=synthetic"],
     "applies to federation.algorithm=federated only"),
    (["adapter.loss=l1"], "adapter.loss=l1: must be one of mse, cosine, mse+cosine, contrastive"),
    (["text_encoder.output=sequence"], "text_encoder.output=sequence: federated training"),
    (["seed=-1"], "seed=-1: must be >= 0"),
    (["device=gpu"], "device=gpu: must be auto, cpu, cuda or cuda:N"),
    (["dataset=esc50"], "dataset.root=None: dataset.name=esc50 needs the ESC-50 folder"),
    (["dataset.split=ratio", "dataset.train_ratio=0.8", "dataset.val_ratio=0.2"],
     "dataset.train_ratio + dataset.val_ratio must be < 1"),
    (["dataset.split=ratio", "dataset.train_ratio=1.0"],
     "dataset.train_ratio=1.0: must be in (0, 1)"),
    (["dataset.test_folds=[3]"], "dataset.test_folds=[3]: fold 3 is also in dataset.train_folds"),
    (["dataset.train_folds=[]"], "dataset.train_folds=[]: must name at least one fold"),
    (["dataset.synthetic.clips_per_class=2"], "dataset.synthetic.clips_per_class=2: must be >= 5"),
    (["federation.partition.num_nodes=0"], "federation.partition.num_nodes=0: must be >= 1"),
    (["federation.partition.alpha=0"], "federation.partition.alpha=0.0: must be > 0"),
    (["federation.partition.min_samples_per_node=0"], "min_samples_per_node=0: must be >= 1"),
    (["federation.nodes=[{classes:[]}]"], "federation.nodes[0].classes=[]: must name at least"),
    (["federation.nodes=[{classes:[dog,dog]}]"], "lists a class twice"),
])
def test_range_errors_name_key_value_and_rule(make_config: Callable[..., DictConfig],
                                              overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(make_config(*overrides))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def _chain(err: BaseException) -> str:
    text = []
    while err is not None:
        text.append(str(err))
        err = err.__cause__
    return "\n".join(text)


@pytest.mark.parametrize(("override", "expected"), [
    ("seed=abc", ["seed=abc", "could not be converted to Integer"]),
    ("generator.granularity=bad", ["expected one of [unified, per_class, per_group]"]),
    ("federation.partition.kind=ring", ["expected one of [classes_per_node, dirichlet, iid]"]),
    ("dataset.train_folds=one", ["dataset.train_folds=one"]),
])
def test_type_errors_are_rejected(make_config: Callable[..., DictConfig], override: str,
                                  expected: list[str]) -> None:
    with pytest.raises(ConfigCompositionException) as err:
        make_config(override)
    for text in expected:
        assert text in _chain(err.value)


@pytest.mark.parametrize("override", ["foo=1", "dataset.bogus=1", "generator.warmup=0.5"])
def test_unknown_keys_are_rejected(make_config: Callable[..., DictConfig], override: str) -> None:
    with pytest.raises(ConfigCompositionException) as err:
        make_config(override)
    assert "not in struct" in _chain(err.value) or "Key '" in _chain(err.value)


def test_unknown_encoder_lists_the_available_ones(make_config: Callable[..., DictConfig]) -> None:
    with pytest.raises(MissingConfigException) as err:
        make_config("audio_encoder=wav2vec")
    assert all(name in str(err.value) for name in ("yamnet", "mfcc", "ast"))
    with pytest.raises(ConfigCompositionException) as chained:
        make_config("text_encoder.name=t5")
    assert "expected one of [minilm, clip]" in _chain(chained.value)


def test_unknown_experiment_lists_the_available_ones(
        make_config: Callable[..., DictConfig]) -> None:
    with pytest.raises(MissingConfigException) as err:
        make_config("+experiment=nope")
    assert "Could not find 'experiment/nope'" in str(err.value)
    for name in EXPERIMENTS:
        assert name in str(err.value)
