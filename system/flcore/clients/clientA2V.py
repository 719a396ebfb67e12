"""The A2V client: trains the audio adapter on its private embeddings and evaluates it."""

import torch
from torch import nn

from flcore.clients.clientbase import (
    ClientBase,
    LocalUpdate,
    SharedTensors,
    StateDict,
    proximal_term,
)
from flcore.config import AdapterConfig
from flcore.metrics.classification import classification_metrics, zero_shot_scores
from flcore.trainmodel.adapters import AdapterLoss, AudioAdapter


@torch.no_grad()
def zero_shot(model: AudioAdapter, shared: SharedTensors,
              idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``[n, K]`` over the label space and label positions ``[n]`` of clips ``idx``."""
    model.eval()
    prompts = shared.prompts[shared.label_space]
    scores = torch.cat([zero_shot_scores(model.embed(shared.tokens[chunk]), prompts)
                        for chunk in idx.split(1024)])
    position = torch.searchsorted(shared.label_space, shared.labels[idx])
    return scores, position


def evaluate(model: AudioAdapter, shared: SharedTensors, idx: torch.Tensor) -> dict[str, float]:
    """Zero-shot ``acc``, ``balanced_acc``, ``macro_f1``, ``top5`` of ``model`` on clips ``idx``."""
    scores, position = zero_shot(model, shared, idx)
    return classification_metrics(position, scores)


class ClientA2V(ClientBase):
    """A node that trains the adapter from its audio embeddings to its class prompts."""

    def train(self, model: AudioAdapter, shared: SharedTensors, loss: AdapterLoss,
              config: AdapterConfig, epochs: int, round_: int, seed: int,
              anchor: StateDict | None = None, mu: float = 0.0,
              keep_optimizer: bool = False) -> LocalUpdate:
        """Local training from ``model``'s current weights; FedProx when ``anchor`` is given."""

        def step_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            value = loss(net.embed(x), y)
            if anchor is not None and mu > 0:
                value = value + proximal_term(net, anchor, mu)
            return value

        last = self.fit(model, step_loss, shared.tokens[self.train_idx],
                        shared.labels[self.train_idx], config, epochs, round_, seed,
                        keep_optimizer)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return LocalUpdate(self.node, state, self.num_train, last)
