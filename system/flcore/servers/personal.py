"""Personalised strategies: FedPer, FedRep and Ditto. Each node keeps an adapter of its own
(``client.model_state``), scored on its own test clips (``node{i}/acc``, ``local/acc_mean``);
the global adapter they also produce is scored as ``global/*``.

For FedPer and FedRep the adapter's body is the per-token MLP (``norm``, ``lift``) and its head
the attention pooling into the text space and the sequence head
(:func:`~flcore.trainmodel.adapters.is_body`): lifting audio tokens is knowledge every node
shares, while where each class lands among the prompts is what label skew makes local."""

from dataclasses import replace
from typing import TYPE_CHECKING

from flcore.clients.protocol import AdapterJob, LocalUpdate, RoundSpec, StateDict
from flcore.config import Config
from flcore.servers.states import offload
from flcore.servers.strategies import FedAvg
from flcore.streams import Purpose, stream_seed
from flcore.trainmodel.adapters import is_body

if TYPE_CHECKING:
    from flcore.clients.clientA2V import ClientA2V


def with_body(own: StateDict, global_state: StateDict) -> StateDict:
    """``own`` adapter with the body of ``global_state``."""
    return {k: global_state[k] if is_body(k) else own[k].to(global_state[k].device)
            for k in global_state}


class FedPer(FedAvg):
    """FedPer (Arivazhagan et al. 2019): nodes train the whole adapter from the global body and
    their own head; the server averages the bodies. It also averages the heads, only to give
    ``global/*`` an adapter to score; a node's head never leaves it for another's."""

    personal = True

    def start(self, client: "ClientA2V", global_state: StateDict) -> StateDict:
        return self.personal_state(client, global_state)

    def accept(self, client: "ClientA2V", update: LocalUpdate) -> None:
        super().accept(client, update)
        client.model_state = offload(update.state)

    def personal_state(self, client: "ClientA2V", global_state: StateDict) -> StateDict:
        assert client.model_state is not None
        return with_body(client.model_state, global_state)


class FedRep(FedPer):
    """FedRep (Collins et al. 2021): each round a node first trains its head alone for
    ``federation.fedrep_head_epochs`` epochs, then the body alone for
    ``federation.local_epochs``; the server averages the bodies."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.head_epochs = config.federation.fedrep_head_epochs

    def phases(self, spec: RoundSpec, global_state: StateDict) -> list[RoundSpec]:
        body = frozenset(k for k in global_state if is_body(k))
        head = frozenset(global_state) - body
        return [replace(spec, epochs=self.head_epochs, trainable=head),
                replace(spec, trainable=body)]


class Ditto(FedAvg):
    """Ditto (Li et al. 2021): besides its FedAvg update, each selected node trains its personal
    adapter for ``federation.local_epochs`` on ``L_i(v) + lambda/2 ||v - w||^2``, ``w`` the
    round's global adapter and ``lambda`` ``federation.ditto_lambda``."""

    personal = True

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.lam = config.federation.ditto_lambda
        self.seed = config.seed

    def anchor(self, global_state: StateDict) -> StateDict | None:
        return global_state

    def jobs(self, client: "ClientA2V", job: AdapterJob, global_state: StateDict,
             round_: int) -> list[AdapterJob]:
        seed = stream_seed(self.seed, round_=round_, node=client.node, generator=0,
                           purpose=Purpose.personal_training)
        return [job, replace(job, start=self.personal_state(client, global_state), seed=seed,
                             mu=self.lam, personal=True, who=f"{job.who} (personal)")]

    def accept_personal(self, client: "ClientA2V", update: LocalUpdate) -> None:
        client.model_state = offload(update.state)

    def personal_state(self, client: "ClientA2V", global_state: StateDict) -> StateDict:
        assert client.model_state is not None
        return {k: v.to(global_state[k].device) for k, v in client.model_state.items()}
