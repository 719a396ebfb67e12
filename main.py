"""FedA2V entry point: ``python main.py [+experiment=NAME] [key=value ...]`` (Hydra)."""

import hydra
from omegaconf import DictConfig

from flcore import FedA2VError
from flcore.run import run


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except FedA2VError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
