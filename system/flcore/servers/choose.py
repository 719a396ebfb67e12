"""Which strategy a run uses: ``federation.algorithm``, then ``server.adapter_training``, then
``federation.aggregation``."""

from flcore.config import AdapterTraining, Aggregation, Algorithm, Config
from flcore.servers.client_dp import ClientLevelDP
from flcore.servers.drift import FedDyn, Scaffold
from flcore.servers.evaluation import Evaluator
from flcore.servers.fedgen import FedGen
from flcore.servers.personal import Ditto, FedPer, FedRep
from flcore.servers.serverbase import clients_per_round
from flcore.servers.strategies import (
    AdapterStrategy,
    Centralized,
    Distillation,
    FedAvg,
    FedAvgThenSynthetic,
    Local,
    SyntheticOnly,
)
from flcore.servers.synthetic import SyntheticLearner


def build_strategy(config: Config, learner: SyntheticLearner,
                   evaluator: Evaluator) -> AdapterStrategy:
    """The strategy of ``federation.algorithm``, ``server.adapter_training`` and
    ``federation.aggregation``."""
    if config.federation.algorithm is Algorithm.local:
        return Local()
    if config.federation.algorithm is Algorithm.centralized:
        return Centralized()
    mode = config.server.adapter_training
    if mode is AdapterTraining.synthetic:
        return SyntheticOnly(learner)
    if mode is AdapterTraining.kd:
        return Distillation(learner)
    if mode is AdapterTraining.fedavg_synthetic:
        return FedAvgThenSynthetic(config, learner, evaluator)
    nodes = len(learner.clients)
    match config.federation.aggregation:
        case Aggregation.scaffold:
            return Scaffold(config, nodes)
        case Aggregation.feddyn:
            return FedDyn(config, nodes)
        case Aggregation.fedper:
            return FedPer(config)
        case Aggregation.fedrep:
            return FedRep(config)
        case Aggregation.ditto:
            return Ditto(config)
        case Aggregation.fedgen:
            return FedGen(config, learner.shared, learner.loss)
    return FedAvg(config, client_level_dp(config, nodes))


def client_level_dp(config: Config, nodes: int) -> ClientLevelDP | None:
    """The server's DP-FedAvg of ``privacy.client_level`` (None without it); its delta is
    ``privacy.delta``, or a tenth of 1 / the nodes."""
    p = config.privacy
    if not p.client_level:
        return None
    delta = p.delta if p.delta is not None else 0.1 / nodes
    return ClientLevelDP(p.client_clip, p.client_noise_multiplier,
                         clients_per_round(config, nodes), nodes, delta, p.accountant,
                         config.seed)
