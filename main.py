"""FedA2V entry point: ``python main.py [+experiment=NAME] [key=value ...]`` (Hydra)."""

import hydra
from omegaconf import DictConfig

from flcore.cli import one_line_compose_errors
from flcore.run import run_job


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    run_job(cfg)


if __name__ == "__main__":
    with one_line_compose_errors():
        main()
