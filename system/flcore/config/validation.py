"""From a composed DictConfig to a checked :class:`Config`: keys the schema lacks first, then
every range and rule of :mod:`flcore.config.checks`."""

import difflib
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_origin

from omegaconf import DictConfig, OmegaConf, open_dict

from flcore.config import algorithm_checks, checks
from flcore.config.schema import Config
from flcore.errors import ConfigError


def _keys(node: Any, prefix: str = "") -> dict[str, bool]:
    """Every dotted path of an attribute of the schema dataclasses under ``node``, mapped to
    whether the schema declares it (``+key=`` adds keys the schema lacks; to_object keeps them
    as attributes). Dict fields (user data such as generator.class_groups) are not entered."""
    found: dict[str, bool] = {}
    if isinstance(node, list):
        for i, item in enumerate(node):
            found.update(_keys(item, f"{prefix}[{i}]."))
    elif is_dataclass(node):
        declared = {f.name for f in fields(node)}
        for key, value in vars(node).items():
            found[f"{prefix}{key}"] = key in declared
            found.update(_keys(value, f"{prefix}{key}."))
    return found


def schema_keys(schema: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key the schema declares (list items and user dicts not entered): what a
    misspelt key is matched against."""
    keys = []
    for f in fields(schema):
        keys.append(prefix + f.name)
        inner = [t for t in (f.type, *get_args(f.type)) if isinstance(t, type) and is_dataclass(t)]
        if inner and get_origin(f.type) is not list:
            keys += schema_keys(inner[0], f"{prefix}{f.name}.")
    return keys


def unknown_key(key: str, known: list[str]) -> ConfigError:
    """The refusal of a key the schema lacks, naming the closest key it has."""
    match = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {match[0]}?" if match else ""
    return ConfigError(f"{key}: not a config key{hint} (docs/configuration.md lists every key)")


def check_known_keys(config: Config) -> None:
    """Refuse the first key that ``+key=`` added and the schema lacks."""
    keys = _keys(config)
    for key, known in keys.items():
        if not known:
            raise unknown_key(key, [k for k, ok in keys.items() if ok])


def without_hydra(cfg: DictConfig) -> DictConfig:
    """``cfg`` less the ``hydra`` node that compose(return_hydra_config=True) adds."""
    if "hydra" not in cfg:
        return cfg
    body = cfg.copy()
    with open_dict(body):
        del body["hydra"]
    return body


def validate(cfg: DictConfig) -> Config:
    """Resolve ``cfg`` into a typed :class:`Config` and check every range; raise ConfigError.
    Paths come back with ``~`` expanded."""
    config = OmegaConf.to_object(without_hydra(cfg))
    assert isinstance(config, Config), "compose the config through configs/config.yaml"
    check_known_keys(config)
    checks.check_run(config)
    config.cache_dir = str(Path(config.cache_dir).expanduser())
    checks.check_dataset(config.dataset)
    checks.check_encoders(config.audio_encoder, config.text_encoder)
    config.embeddings.cache_dir = str(Path(config.embeddings.cache_dir).expanduser())
    checks.check_embeddings(config.embeddings)
    checks.check_federation(config.federation)
    algorithm_checks.check_rounds(config.federation)
    checks.check_adapter(config.adapter)
    checks.check_executor(config.executor)
    checks.check_eval(config.eval)
    algorithm_checks.check_privacy(config)
    checks.check_checkpoint(config.checkpoint)
    checks.check_generator(config.generator)
    if config.generator.load_from is not None:
        config.generator.load_from = str(Path(config.generator.load_from).expanduser())
        checks.check_load_from(config.generator.load_from)
    algorithm_checks.check_server(config)
    checks.check_generator_use(config)
    checks.check_images(config)
    return config
