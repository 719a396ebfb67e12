"""The generator model of ``generator.model``: a VAE bank or the closed-form Gaussian floor,
built, restored and received through one door so callers never branch on the model."""

import torch

from flcore.config import GeneratorConfig, GeneratorModel
from flcore.trainmodel.gaussian import GaussianBank
from flcore.trainmodel.generators import GeneratorBank, GeneratorSpec

Bank = GeneratorBank | GaussianBank


def new_bank(spec: GeneratorSpec, features: int, config: GeneratorConfig, cond_dim: int,
             device: torch.device) -> Bank:
    """Untrained generators of ``spec``; a VAE bank is conditioned on ``cond_dim``-wide class
    prompts when ``cond_dim > 0`` (a Gaussian bank models each class apart and needs none)."""
    if config.model is GeneratorModel.gaussian:
        return GaussianBank(spec, features, config.gaussian_covariance.value,
                            config.gaussian_rank, device)
    return GeneratorBank(spec, features, config, cond_dim, device)


def bank_from_decoder(package: dict, config: GeneratorConfig, device: torch.device) -> Bank:
    """A bank that samples from what a node sent with ``generator.share=decoder``."""
    if config.model is GeneratorModel.gaussian:
        return GaussianBank.from_decoder(package, config, device)
    return GeneratorBank.from_decoder(package, config, device)


def bank_features(state: dict) -> int:
    """Row width of a saved bank's ``state_dict``."""
    if "features" in state:
        return int(state["features"])
    return int(state["model"]["dec_out.weight"].shape[-1])
