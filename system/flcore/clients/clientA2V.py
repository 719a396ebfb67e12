"""The A2V client: trains the audio adapter on its private embeddings and evaluates it."""

import math
from dataclasses import dataclass

import torch

from flcore.clients.clientbase import ClientBase
from flcore.clients.protocol import AdapterJob, LocalUpdate, RoundSpec, SharedTensors, StateDict
from flcore.clients.training import fit, linear_term, proximal_term, training_seed
from flcore.config import AdapterConfig, GeneratorConfig, Granularity, ShareMode, TrainingData
from flcore.metrics.classification import classification_metrics, zero_shot_scores
from flcore.streams import Purpose, stream, stream_seed
from flcore.trainmodel.adapters import AdapterLoss, AudioAdapter
from flcore.trainmodel.banks import Bank, new_bank
from flcore.trainmodel.generators import (
    SyntheticShare,
    generator_rows,
    generator_spec,
)


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


@torch.no_grad()
def sequence_fit(model: AudioAdapter, shared: SharedTensors,
                 idx: torch.Tensor) -> dict[str, float]:
    """How close the sequence head's outputs on clips ``idx`` come to the token sequences of
    their classes: ``sequence_mse`` (mean squared error per element) and ``sequence_acc``
    (the nearest class sequence of the label space is the clip's own)."""
    assert shared.sequence is not None
    model.eval()
    targets = shared.sequence[shared.label_space].flatten(1)
    errors, hits = [], []
    for chunk in idx.split(256):
        sequence = model.outputs(shared.tokens[chunk])[1]
        assert sequence is not None
        mse = torch.cdist(sequence.flatten(1), targets).square() / targets.shape[1]
        position = torch.searchsorted(shared.label_space, shared.labels[chunk])
        errors.append(mse.gather(1, position[:, None]).squeeze(1))
        hits.append(mse.argmin(1) == position)
    return {"sequence_mse": torch.cat(errors).mean().item(),
            "sequence_acc": torch.cat(hits).double().mean().item()}


def evaluate(model: AudioAdapter, shared: SharedTensors, idx: torch.Tensor) -> dict[str, float]:
    """Zero-shot ``acc``, ``balanced_acc``, ``macro_f1``, ``top5`` of ``model`` on clips ``idx``."""
    scores, position = zero_shot(model, shared, idx)
    return classification_metrics(position, scores)


def train_adapter(model: AudioAdapter, shared: SharedTensors, loss: AdapterLoss, job: AdapterJob,
                  spec: RoundSpec) -> LocalUpdate:
    """One client's local training (:func:`fit`) of ``model`` from ``job.start``, with the
    strategy's terms: the sequential executor's unit of work and the reference the others are
    tested against."""
    synthetic = job.synthetic

    def step_loss(net: AudioAdapter, x: torch.Tensor, y: torch.Tensor, key: torch.Tensor,
                  step: int) -> torch.Tensor:
        pooled, sequence = net.outputs(x, key)
        value = loss(pooled, y, sequence)
        if spec.proximal(job):
            value = value + proximal_term(net, spec.anchor, job.mu)
        if job.linear is not None:
            value = value + linear_term(net, job.linear)
        if synthetic is not None and spec.synthetic_weight > 0:
            value = value + spec.synthetic_weight * loss(
                net.head_embed(synthetic.features[step]), synthetic.labels[step])
        return value

    model.load_state_dict(job.start)
    gradients = ({n: torch.zeros_like(p) for n, p in model.named_parameters()
                  if spec.trainable is None or n in spec.trainable}
                 if spec.gradient_mean else None)
    last, optimizer = fit(model, step_loss, shared.tokens[job.rows], shared.labels[job.rows],
                          spec.config, spec.epochs, job.seed, job.who, job.optimizer_state,
                          trainable=spec.trainable, gradient_sum=gradients)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    mean = None
    if gradients is not None:
        steps = spec.epochs * math.ceil(len(job.rows) / spec.config.batch_size)
        mean = {n: g / steps - (0 if job.linear is None else job.linear[n])
                for n, g in gradients.items()}
    return LocalUpdate(job.node, state, len(job.rows), last,
                       optimizer if spec.keep_optimizer else None, mean)


def condition_width(shared: SharedTensors, config: GeneratorConfig,
                    granularity: Granularity) -> int:
    """Width of the class condition of generators of ``granularity``: the class prompts' for
    generators of several classes (unified, per group) under ``generator.conditional``, else 0
    (a per-class generator has one class; an unconditional one is labelled by centroids)."""
    several = granularity is not Granularity.per_class
    return shared.prompts.shape[1] if config.conditional and several else 0


@dataclass
class GeneratorJob:
    """One node's generator training in a round (see :meth:`ClientA2V.generator_job`)."""

    x: torch.Tensor
    labels: torch.Tensor
    prompts: torch.Tensor | None
    rngs: list[torch.Generator]
    where: str
    seed: int


class ClientA2V(ClientBase):
    """A node that trains the adapter from its audio embeddings to its class prompts, and VAE
    generators of those embeddings."""

    def __init__(self, node: int, classes: list[str], train: torch.Tensor, val: torch.Tensor,
                 test: torch.Tensor, granularity: Granularity | None = None) -> None:
        super().__init__(node, classes, train, val, test)
        self.granularity = granularity
        self.generators: Bank | None = None

    def train(self, model: AudioAdapter, shared: SharedTensors, loss: AdapterLoss,
              config: AdapterConfig, epochs: int, round_: int, seed: int,
              anchor: StateDict | None = None, mu: float = 0.0,
              keep_optimizer: bool = False) -> LocalUpdate:
        """Local training from ``model``'s current weights; FedProx when ``anchor`` is given.
        A stateful client (``keep_optimizer``) keeps its optimizer state between rounds."""
        job = AdapterJob(self.node, self.train_idx, model.state_dict(),
                         self.optimizer_state if keep_optimizer else None,
                         training_seed(seed, round_, self.node),
                         f"node {self.node}, round {round_}", mu=mu)
        update = train_adapter(model, shared, loss, job,
                               RoundSpec(config, epochs, anchor, keep_optimizer))
        if keep_optimizer:
            self.optimizer_state = update.optimizer_state
        return update

    def new_generators(self, shared: SharedTensors, config: GeneratorConfig) -> Bank:
        """This node's generators, untrained: one per class, per group, or one for all. With
        ``generator.conditional`` the generators of several classes (unified, per group) are
        conditioned on the class prompt, so each draw is of the class it was drawn for."""
        granularity = self.granularity or config.granularity
        spec = generator_spec(sorted(set(shared.labels[self.train_idx].tolist())),
                              shared.class_names, granularity, config.class_groups)
        width = (shared.prompts.shape[-1] if config.training_data is TrainingData.adapter_output
                 else shared.tokens.shape[-1])
        features = config.sequence_length * width
        return new_bank(spec, features, config, condition_width(shared, config, granularity),
                        shared.tokens.device)

    def generator_inputs(self, shared: SharedTensors, config: GeneratorConfig,
                         adapter: AudioAdapter | None) -> torch.Tensor:
        """What the generators model: the node's audio tokens, or (``training_data:
        adapter_output``) its adapter's outputs, pooled to ``sequence_length`` and flattened."""
        source = shared.tokens[self.train_idx]
        if adapter is not None:
            adapter.eval()
            with torch.no_grad():
                source = adapter(source)
        return generator_rows(source, config.sequence_length)

    def generator_job(self, shared: SharedTensors, config: GeneratorConfig, round_: int,
                      seed: int, adapter: AudioAdapter | None = None) -> GeneratorJob:
        """What this node's generators train on this round: its training embeddings (or
        ``adapter``'s outputs), their classes, the class prompts of a conditional bank, and one
        seeded noise stream per generator. Builds the bank on first use."""
        x = self.generator_inputs(shared, config, adapter)
        labels = shared.labels[self.train_idx]
        self.generators = self.generators or self.new_generators(shared, config)
        prompts = shared.prompts if self.generators.model.cond else None
        rngs = [stream(seed, round_=round_, node=self.node, generator=g,
                       purpose=Purpose.generator_training, device=x.device)
                for g in range(self.generators.model.k)]
        draws = stream_seed(seed, round_=round_, node=self.node, generator=0,
                            purpose=Purpose.synthetic_samples)
        return GeneratorJob(x, labels, prompts, rngs, f"node {self.node}, round {round_}: ",
                            draws)

    def share_generators(self, job: GeneratorJob, config: GeneratorConfig) -> SyntheticShare:
        """What the node sends after training: synthetic samples with their class ids, or its
        decoders (``generator.share``). Audio and real embeddings never leave the node."""
        present = job.labels.unique().tolist()
        counts = {c: int((job.labels == c).sum()) if config.synthetic_samples_per_class == "auto"
                  else int(config.synthetic_samples_per_class) for c in present}
        share = SyntheticShare(self.node, counts, torch.Generator().manual_seed(job.seed))
        assert self.generators is not None
        if config.share is ShareMode.decoder:
            share.decoder = self.generators.decoder_package()
        else:
            centroids = {c: job.x[job.labels == c].mean(0) for c in present}
            share.x, share.y = self.generators.sample(counts, job.prompts, centroids, share.rng)
        return share
