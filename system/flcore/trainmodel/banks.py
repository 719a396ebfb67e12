"""The generator model of ``generator.model``: a VAE bank, the closed-form Gaussian floor or the
class-agnostic noise control, built, restored and received through one door so callers never
branch on the model."""

from collections.abc import Sequence

import torch

from flcore.clients.protocol import PrivacySpec
from flcore.config import GeneratorConfig, GeneratorModel
from flcore.trainmodel.bank_training import EpochLog, train_banks
from flcore.trainmodel.gaussian import GaussianBank, NoiseBank
from flcore.trainmodel.generators import GeneratorBank, GeneratorSpec
from flcore.trainmodel.vae import VAELoss

Bank = GeneratorBank | GaussianBank
#: The banks fitted in closed form, by ``generator.model``.
CLOSED_FORM: dict[GeneratorModel, type[GaussianBank]] = {GeneratorModel.gaussian: GaussianBank,
                                                         GeneratorModel.noise: NoiseBank}


def new_bank(spec: GeneratorSpec, features: int, config: GeneratorConfig, cond_dim: int,
             device: torch.device) -> Bank:
    """Untrained generators of ``spec``; a VAE bank is conditioned on ``cond_dim``-wide class
    prompts when ``cond_dim > 0`` (a closed-form bank needs none)."""
    if config.model in CLOSED_FORM:
        return CLOSED_FORM[config.model](spec, features, config.gaussian_covariance.value,
                                         config.gaussian_rank, device)
    return GeneratorBank(spec, features, config, cond_dim, device)


def bank_from_decoder(package: dict, config: GeneratorConfig, device: torch.device) -> Bank:
    """A bank that samples from what a node sent with ``generator.share=decoder``."""
    if config.model in CLOSED_FORM:
        return CLOSED_FORM[config.model].from_decoder(package, config, device)
    return GeneratorBank.from_decoder(package, config, device)


def bank_features(state: dict) -> int:
    """Row width of a saved bank's ``state_dict``."""
    if "features" in state:
        return int(state["features"])
    return int(state["model"]["dec_out.weight"].shape[-1])


def fit_together(banks: Sequence[Bank], xs: Sequence[torch.Tensor],
                 labels: Sequence[torch.Tensor], prompts: Sequence[torch.Tensor | None],
                 loss: VAELoss | None, rngs: Sequence[list[torch.Generator]],
                 wheres: Sequence[str], max_generators: int | None = None,
                 privacy: PrivacySpec | None = None) -> list[list[EpochLog]]:
    """``[bank.fit(xs[i], labels[i], prompts[i], loss, rngs[i], wheres[i]) for each bank]``, with
    the VAE banks of one shape (features, hidden, latent, cond, learned variance) trained as one
    stacked model (:func:`~flcore.trainmodel.bank_training.train_banks`: the same weights,
    optimizer states and logs as one by one, to float tolerance; at most ``max_generators``
    generators at a time, ``None`` for all). Banks of different shapes (a node whose
    granularity override makes its generators conditional) train as separate stacks; Gaussian
    banks are fitted one by one (closed form). ``privacy``: DP-SGD of the VAE banks. Returns
    each bank's epoch logs, in the order of ``banks``."""
    if not len(xs) == len(labels) == len(prompts) == len(rngs) == len(wheres) == len(banks):
        raise ValueError(f"fit_together: {len(banks)} banks need as many xs, labels, prompts, "
                         "rngs and wheres")
    logs: list[list[EpochLog]] = [[] for _ in banks]
    stacks: dict[tuple, list[int]] = {}
    for i, bank in enumerate(banks):
        if isinstance(bank, GeneratorBank):
            stacks.setdefault(bank.shape(), []).append(i)
        else:
            logs[i] = bank.fit(xs[i], labels[i], prompts[i], loss, rngs[i], wheres[i])
    for members in stacks.values():
        trained = train_banks([banks[i] for i in members], [xs[i] for i in members],
                              [labels[i] for i in members], [prompts[i] for i in members], loss,
                              [rngs[i] for i in members], [wheres[i] for i in members],
                              max_generators, privacy)
        for i, bank_logs in zip(members, trained, strict=True):
            logs[i] = bank_logs
    return logs
