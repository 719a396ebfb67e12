"""Which strategy a run uses: ``federation.algorithm``, then ``server.adapter_training``, then
``federation.aggregation``."""

from flcore.config import AdapterTraining, Aggregation, Algorithm, Config
from flcore.servers.drift import FedDyn, Scaffold
from flcore.servers.evaluation import Evaluator
from flcore.servers.fedgen import FedGen
from flcore.servers.personal import Ditto, FedPer, FedRep
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
    return FedAvg(config)
