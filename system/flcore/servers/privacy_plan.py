"""The run's DP-SGD plan (``privacy=dp``): how each node's adapter and generators use its clips,
and the :class:`~flcore.privacy.accounting.Ledger` that derives the noise and books the
spending."""

from flcore.choices import Aggregation
from flcore.clients.clientA2V import ClientA2V
from flcore.clients.protocol import SharedTensors
from flcore.config import Config
from flcore.privacy.accounting import Ledger, Use, plan, use
from flcore.trainmodel.generators import generator_spec


def generator_uses(config: Config, shared: SharedTensors, client: ClientA2V) -> list[Use]:
    """The DP-SGD use of each of ``client``'s generators: its rows are the node's training
    clips of the generator's classes."""
    g = config.generator
    labels = shared.labels[client.train_idx]
    spec = generator_spec(sorted(set(labels.tolist())), shared.class_names,
                          client.granularity or g.granularity, g.class_groups)
    return [use(sum(int((labels == c).sum()) for c in classes), g.batch_size,
                g.training_epochs) for classes in spec.classes]


def adapter_epochs(config: Config) -> int:
    """Epochs a node's adapter trains on its clips in a round: ``federation.local_epochs``,
    plus FedRep's head epochs, twice for Ditto (its global and its personal adapter)."""
    f = config.federation
    if f.aggregation is Aggregation.fedrep:
        return f.fedrep_head_epochs + f.local_epochs
    return 2 * f.local_epochs if f.aggregation is Aggregation.ditto else f.local_epochs


def privacy_ledger(config: Config, shared: SharedTensors, clients: list[ClientA2V],
                   trains_adapters: bool) -> Ledger:
    """The ledger of ``config``'s run: every node's adapter (when clients train adapters) and
    generators (when they train generators) over the planned rounds; the noise multiplier is
    ``privacy.noise_multiplier`` or the smallest that meets ``privacy.target_epsilon``."""
    p, f, g = config.privacy, config.federation, config.generator
    adapters = ({c.node: use(len(c.train_idx), config.adapter.batch_size, adapter_epochs(config))
                 for c in clients} if trains_adapters else {})
    generators = ({c.node: generator_uses(config, shared, c) for c in clients}
                  if g.enabled else {})
    deltas = {c.node: p.delta if p.delta is not None else 0.1 / len(c.train_idx)
              for c in clients}
    return plan(adapters, f.rounds, p.noise_multiplier, p.target_epsilon, deltas, p.accountant,
                generators, f.rounds // g.train_every if g.enabled else 0)
