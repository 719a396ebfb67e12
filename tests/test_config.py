"""Config composition, schema enforcement and range checks (all before any work)."""

import dataclasses
import typing
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig, OmegaConf

from conftest import CONFIGS
from flcore.config import AdapterTraining, Config, Granularity, PipelineName, validate
from flcore.errors import ConfigError

EXPERIMENT_DIR = Path(__file__).parents[1] / "configs" / "experiment"
EXPERIMENTS = sorted(p.stem for p in EXPERIMENT_DIR.glob("*.yaml"))
CONFIGURATION_DOC = Path(__file__).parents[1] / "docs" / "configuration.md"


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
    """Rendering experiments take the pipeline's folder from the command line."""
    config = validate(make_config(f"+experiment={experiment}", f"dataset.root={tmp_path}",
                                  f"images.path={tmp_path}"))
    assert config.name == experiment
    if config.images.pipeline is not PipelineName.none:
        assert config.text_encoder.path == str(tmp_path)


@pytest.mark.parametrize("experiment", ["synthetic_sd", "synthetic_flux"])
def test_rendering_experiments_ask_for_the_pipeline(make_config: Callable[..., DictConfig],
                                                    experiment: str) -> None:
    with pytest.raises(ConfigError, match=r"^images\.path=None: images\.pipeline=\w+ needs"):
        validate(make_config(f"+experiment={experiment}"))


def test_esc50_experiment_uses_the_five_categories(make_config: Callable[..., DictConfig]) -> None:
    config = validate(make_config("+experiment=esc50_perclass", "dataset.root=/data/ESC-50"))
    assert config.federation.nodes is not None
    assert [len(n.classes) for n in config.federation.nodes] == [10] * 5
    assert len({c for n in config.federation.nodes for c in n.classes}) == 50
    assert config.dataset.train_folds == [1, 2, 3, 4] and config.dataset.test_folds == [5]


@pytest.mark.parametrize(("overrides", "expected"), [
    ([], AdapterTraining.fedavg_synthetic),
    (["generator=none"], AdapterTraining.fedavg),
    (["federation.algorithm=centralized"], AdapterTraining.fedavg),
    (["server.adapter_training=fedavg+synthetic"], AdapterTraining.fedavg_synthetic),
    (["server.adapter_training=kd"], AdapterTraining.kd),
])
def test_adapter_training_resolves_to_its_enum(make_config: Callable[..., DictConfig],
                                               overrides: list[str],
                                               expected: AdapterTraining) -> None:
    """The interpolated default and a value set on the command line both become a member."""
    assert validate(make_config(*overrides)).server.adapter_training is expected


def test_logger_selection_is_a_list(make_config: Callable[..., DictConfig]) -> None:
    assert validate(make_config("logger=[csv]")).logger.wandb is None
    none = validate(make_config("logger=none")).logger
    assert none.csv is None and none.wandb is None


SD = ["images=sd", "images.path=/models/sd", "text_encoder=clip", "text_encoder.output=sequence"]


@pytest.mark.parametrize("executor", ["sequential", "batched", "ray"])
def test_executor_options_pass_with_the_keys_they_set(make_config: Callable[..., DictConfig],
                                                      executor: str) -> None:
    """The keys each configs/executor file sets are not taken as keys the user set."""
    assert validate(make_config(f"executor={executor}")).executor.name.value == executor


@pytest.mark.parametrize(("overrides", "message"), [
    (["generator.beta_warmup_ratio=1.5"], "generator.beta_warmup_ratio=1.5: must be in (0, 1]"),
    (["generator.beta_warmup_ratio=0"], "generator.beta_warmup_ratio=0.0: must be in (0, 1]"),
    (["generator.training_epochs=0"], "generator.training_epochs=0: must be >= 1"),
    (["threads=0"], "threads=0: must be >= 1, or null for this process's share of the CPUs"),
    (["generator.model=gaussian", "generator.likelihood=mse"],
     "generator.likelihood=mse: is a VAE loss; generator.model=gaussian is fitted in closed form"),
    (["generator.model=gaussian", "generator.free_bits=0.5"],
     "generator.free_bits=0.5: is a VAE loss term; generator.model=gaussian has no latent code"),
    (["generator.gaussian_covariance=low_rank"],
     "generator.gaussian_rank=0: generator.gaussian_covariance=low_rank needs a rank >= 1"),
    (["generator.gaussian_rank=3"], "generator.gaussian_rank=3: only generator.gaussian_covariance"
                                    "=low_rank has a rank"),
    (["generator.gaussian_covariance=low_rank", "generator.gaussian_rank=2"],
     "generator.gaussian_covariance=low_rank: applies to generator.model=gaussian only"),
    (["generator.model=noise", "generator.gaussian_covariance=low_rank",
      "generator.gaussian_rank=2"],
     "generator.gaussian_covariance=low_rank: applies to generator.model=gaussian only"),
    (["generator.model=noise", "generator.likelihood=mse"],
     "generator.likelihood=mse: is a VAE loss; generator.model=noise is fitted in closed form"),
    (["server.synthetic_mu=-1"], "server.synthetic_mu=-1.0: must be >= 0"),
    (["eval.prdc_k=0"], "eval.prdc_k=0: must be >= 1"),
    (["generator.beta_max=-1"], "generator.beta_max=-1.0: must be > 0"),
    (["generator.granularity=per_group"], "generator.class_groups={}: generator.granularity="
                                          "per_group needs groups"),
    (["+generator.class_groups={a:[dog,cat],b:[cat]}"], "class 'cat' is already in group 'a'"),
    (["generator.synthetic_samples_per_class=0"],
     "generator.synthetic_samples_per_class=0: must be a positive integer or auto"),
    (["generator.synthetic_samples_per_class=some"],
     "generator.synthetic_samples_per_class=some: must be a positive integer or auto"),
    (["federation.algorithm=local", "server.adapter_training=synthetic"],
     "applies to federation.algorithm=federated only"),
    (["adapter.loss=l1"], "adapter.loss=l1: must be one of mse, cosine, mse+cosine, contrastive"),
    (["images=sd"], "images.pipeline=sd: it is conditioned on CLIP token sequences (77 x 768 "
     "for SD 1.x), which text_encoder=minilm text_encoder.output=pooled does not produce; use "
     "text_encoder=clip text_encoder.output=sequence"),
    (["images=sd", "text_encoder=clip"], "text_encoder=clip text_encoder.output=pooled does not"),
    (["images=flux", "text_encoder=clip", "text_encoder.output=sequence"],
     "images.pipeline=flux: it is conditioned on a CLIP pooled embedding and T5 token "
     "sequences, which text_encoder=clip text_encoder.output=sequence does not produce; use "
     "text_encoder=clip_t5"),
    (["images=sd", "text_encoder=clip", "text_encoder.output=sequence"],
     "images.path=None: images.pipeline=sd needs the pipeline's weights"),
    ([*SD, "text_encoder.max_length=64"],
     "text_encoder.max_length=64: images.pipeline=sd attends to 77 CLIP tokens"),
    ([*SD, "images.height=100"], "images.height=100: must be a multiple of 8"),
    ([*SD, "images.splits=[train]"], "images.splits=[train]: must be a non-empty list"),
    ([*SD, "images.log_limit=51"], "images.log_limit=51: must be in [0, 50]"),
    ([*SD, "images.source=synthetic", "generator=none"],
     "images.source=synthetic: renders generator samples of audio embeddings"),
    ([*SD, "images.judge_prompt=photo"], "images.judge_prompt='photo': must contain {name}"),
    (["adapter.sequence_weight=-1"], "adapter.sequence_weight=-1.0: must be >= 0"),
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
    (["dataset.clip_seconds=0"], "dataset.clip_seconds=0.0: must be null (no stated length) or "
     "in (0, 3600]"),
    (["dataset=folder", "dataset.root=/x", "dataset.strict=true"],
     "dataset.strict=True: refuses clips shorter than dataset.clip_seconds, which is null; set it"),
    (["federation.partition.num_nodes=0"], "federation.partition.num_nodes=0: must be >= 1"),
    (["federation.partition.alpha=0"], "federation.partition.alpha=0.0: must be > 0"),
    (["federation.partition.min_samples_per_node=0"], "min_samples_per_node=0: must be >= 1"),
    (["federation.nodes=[{classes:[]}]"], "federation.nodes[0].classes=[]: must name at least"),
    (["federation.nodes=[{classes:[dog,dog]}]"], "lists a class twice"),
    (["checkpoint.every=-1"], "checkpoint.every=-1: must be >= 0 (0 = no checkpoints)"),
    (["executor=sequential", "executor.clients_per_batch=8"],
     "executor.clients_per_batch=8: applies to executor=batched and executor=ray only, not "
     "executor=sequential; drop it"),
    (["executor=batched", "executor.num_gpus=0.5"],
     "executor.num_gpus=0.5: applies to executor=ray only, not executor=batched; drop it"),
    (["executor=sequential", "executor.address=auto"],
     "executor.address=auto: applies to executor=ray only, not executor=sequential; drop it"),
    (["executor.max_retries=3"], "executor.max_retries=3: applies to executor=ray only"),
    (["executor.num_cpus=2"], "executor.num_cpus=2.0: applies to executor=ray only"),
    (["executor.connect_timeout_s=5"], "executor.connect_timeout_s=5.0: applies to executor=ray"),
    (["generator=none", "server.adapter_training=synthetic"],
     "server.adapter_training=synthetic: needs synthetic samples: set generator.enabled=true"),
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
    ("server.adapter_training=fedprox",
     ["expected one of [fedavg, synthetic, fedavg+synthetic, kd]"]),
    ("dataset.train_folds=one", ["dataset.train_folds=one"]),
    ("checkpoint.optimizer_state=maybe", ["Value 'maybe' is not a valid bool"]),
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


@pytest.mark.parametrize(("override", "message"), [
    ("+generator.beta_warmup=0.25", "generator.beta_warmup: not a config key; did you mean "
                                    "generator.beta_warmup_ratio? (docs/configuration.md lists "
                                    "every key)"),
    ("+beta_warmup_ratio=0.25", "beta_warmup_ratio: not a config key; did you mean "
                                "generator.beta_warmup_ratio?"),
    ("+federation.partition.alpah=0.3", "did you mean federation.partition.alpha?"),
    ("+checkpoint.optimizer=false", "did you mean checkpoint.optimizer_state?"),
    ("+foo=1", "foo: not a config key (docs/configuration.md lists every key)"),
])
def test_keys_added_with_plus_must_be_in_the_schema(make_config: Callable[..., DictConfig],
                                                    override: str, message: str) -> None:
    cfg = make_config(override)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key", ["generator.class_groups", "+generator.class_groups"])
def test_class_groups_are_set_with_or_without_plus(make_config: Callable[..., DictConfig],
                                                   key: str) -> None:
    groups = "{tonal:[rising_chirp,siren_wail],impulsive:[bell_ring]}"
    config = validate(make_config("generator=per_group", f"{key}={groups}"))
    assert config.generator.class_groups == {"tonal": ["rising_chirp", "siren_wail"],
                                             "impulsive": ["bell_ring"]}


def test_class_groups_override_merges_into_an_experiments_groups(
        make_config: Callable[..., DictConfig]) -> None:
    groups = validate(make_config("+experiment=synthetic_pergroup",
                                  "generator.class_groups={tonal:[rising_chirp]}")
                      ).generator.class_groups
    assert groups["tonal"] == ["rising_chirp"]
    assert set(groups) == {"tonal", "impulsive", "noisy"}


def test_class_groups_still_refuse_a_wrong_type(make_config: Callable[..., DictConfig]) -> None:
    with pytest.raises(ConfigCompositionException) as err:
        make_config("generator.class_groups={tonal:bell_ring}")
    assert "incompatible with type hint" in _chain(err.value)


def test_load_from_must_be_a_run_folder_with_a_checkpoint(
        make_config: Callable[..., DictConfig], tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=rf"^generator\.load_from={missing}: no such folder"):
        validate(make_config(f"generator.load_from={missing}"))
    with pytest.raises(ConfigError, match=rf"^generator\.load_from={tmp_path}: has no "
                                          r"checkpoints/round_\*\.pt"):
        validate(make_config(f"generator.load_from={tmp_path}"))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "round_0001.pt").touch()
    assert validate(make_config(f"generator.load_from={tmp_path}")).generator.load_from == str(
        tmp_path)


def test_load_from_expands_the_home_folder(make_config: Callable[..., DictConfig],
                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "round_0002.pt").touch()
    config = validate(make_config("generator.load_from='~/run'"))
    assert config.generator.load_from == str(tmp_path / "run")


def test_checkpoints_can_be_turned_off_or_made_without_optimizer_states(
        make_config: Callable[..., DictConfig]) -> None:
    assert validate(make_config()).checkpoint.optimizer_state is True
    config = validate(make_config("checkpoint.every=0", "checkpoint.optimizer_state=false"))
    assert config.checkpoint.every == 0
    assert config.checkpoint.optimizer_state is False


def _leaves(tree: object, prefix: str = "") -> list[str]:
    if isinstance(tree, dict) and tree:
        return [k for key, value in tree.items() for k in _leaves(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")]


def test_configuration_doc_lists_every_key(make_config: Callable[..., DictConfig]) -> None:
    doc = CONFIGURATION_DOC.read_text()
    keys = _leaves(OmegaConf.to_container(make_config()))
    assert [k for k in keys if f"`{k}`" not in doc] == []


def test_unknown_encoder_lists_the_available_ones(make_config: Callable[..., DictConfig]) -> None:
    with pytest.raises(MissingConfigException) as err:
        make_config("audio_encoder=wav2vec")
    assert all(name in str(err.value) for name in ("yamnet", "mfcc", "ast"))
    with pytest.raises(ConfigCompositionException) as chained:
        make_config("text_encoder.name=t5")
    assert "expected one of [minilm, clip, clip_t5]" in _chain(chained.value)


def test_unknown_experiment_lists_the_available_ones(
        make_config: Callable[..., DictConfig]) -> None:
    with pytest.raises(MissingConfigException) as err:
        make_config("+experiment=nope")
    assert "Could not find 'experiment/nope'" in str(err.value)
    for name in EXPERIMENTS:
        assert name in str(err.value)


def _schema_disagreements(schema: type, composed: object, prefix: str = "") -> dict[str, tuple]:
    """``{key: (dataclass default, composed value)}`` for every field of ``schema`` whose
    default differs from what ``python main.py`` composes from configs/."""
    found: dict[str, tuple] = {}
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        default = (f.default if f.default is not dataclasses.MISSING
                   else f.default_factory())  # type: ignore[misc]
        value = composed.get(f.name, "<absent>") if isinstance(composed, dict) else "<absent>"
        if dataclasses.is_dataclass(default):
            found.update(_schema_disagreements(type(default), value, f"{key}."))
        elif value != (list(default) if isinstance(default, tuple) else default):
            found[key] = (default, value)
    return found


def test_the_schema_defaults_are_the_composed_defaults() -> None:
    """Defaults live in the dataclasses; ``config.yaml`` and the logger options list some again
    for the reader: ``python main.py`` must compose exactly the dataclasses' values, except the
    interpolations the YAML makes and the logger entries its groups add (their schema default is
    off)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        composed = OmegaConf.to_container(compose("config"), resolve=False)
    found = _schema_disagreements(Config, composed)
    assert found.pop("dataset.clip_seconds") == (None, "${.synthetic.duration_s}")
    assert found.pop("logger.csv")[0] is None and found.pop("logger.wandb")[0] is None
    assert found == {}


GROUPS = sorted(p.name for p in CONFIGS.iterdir()
                if p.is_dir() and p.name not in ("experiment", "hydra"))
OPTIONS = [f"{group}/{p.stem}" for group in GROUPS
           for p in sorted((CONFIGS / group).glob("*.yaml"))]
#: Options that list their keys at the schema's defaults for the reader (a tracker's section is
#: the option): each value they list must be the schema's, so a changed default leaves no copy.
LISTINGS = {"logger/csv", "logger/wandb"}
#: The key that names each group's option, set even where it is the schema's default so that the
#: option stays itself whatever the default becomes.
NAMING_KEYS = {"audio_encoder": "name", "dataset": "name", "executor": "name",
               "federation": "partition.kind", "generator": "granularity", "images": "pipeline",
               "privacy": "enabled", "text_encoder": "name"}
#: Keys the option's user must fill in, shown as null.
PLACEHOLDERS = {"dataset/esc50": {"root"}, "dataset/folder": {"root", "csv"}}


def _schema_of(annotation: object) -> type | None:
    """The dataclass ``annotation`` names, alone or as ``X | None``."""
    for t in (annotation, *typing.get_args(annotation)):
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            return t
    return None


def _against_schema(schema: type, values: dict, prefix: str = "") -> list[tuple[str, object,
                                                                             object]]:
    """``(key, value, schema default)`` of every leaf in ``values`` (a section of ``schema``)."""
    leaves = []
    by_name = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in values.items():
        f = by_name[key]
        inner = _schema_of(f.type)
        if inner is not None and isinstance(value, dict):
            leaves += _against_schema(inner, value, f"{prefix}{key}.")
            continue
        default = (f.default if f.default is not dataclasses.MISSING
                   else f.default_factory())  # type: ignore[misc]
        leaves.append((f"{prefix}{key}", value, default))
    return leaves


@pytest.mark.parametrize("option", OPTIONS)
def test_group_options_hold_what_differs_from_the_schema(option: str) -> None:
    """Defaults live in one place, the dataclasses: an option file sets the key that names it,
    the values in which it differs and the placeholders its user fills in; a listing repeats
    the defaults exactly."""
    group = option.split("/")[0]
    path = CONFIGS / f"{option}.yaml"
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    values.pop("defaults", None)
    # An option in the global package (privacy=dp) also sets keys of other sections.
    sections = values if "# @package _global_" in path.read_text() else {group: values}
    schemas = {f.name: f.type for f in dataclasses.fields(Config)}
    leaves = [leaf for name, section in sections.items()
              for leaf in _against_schema(schemas[name], section,
                                          "" if name == group else f"{name}.")]
    if option in LISTINGS:
        assert [(k, v, d) for k, v, d in leaves if v != d] == []
        return
    kept = {NAMING_KEYS.get(group), *PLACEHOLDERS.get(option, ())}
    assert [(k, v) for k, v, d in leaves if v == d and k not in kept] == []
    assert all(v is None for k, v, _ in leaves if k in PLACEHOLDERS.get(option, ()))
