"""The A2V server: the round loop of adapters, generators and synthetic samples, and zero-shot
evaluation."""

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flcore import checkpoint
from flcore.clients.clientA2V import ClientA2V, condition_width
from flcore.clients.clientbase import (
    AdapterJob,
    LocalUpdate,
    RoundSpec,
    SharedTensors,
    StateDict,
    build_adapter,
    build_adapter_loss,
    fit,
    proximal_term,
    training_seed,
)
from flcore.config import (
    Algorithm,
    Config,
    Granularity,
    ImageSource,
    ScheduleScope,
    ServerGranularity,
    TrainingData,
)
from flcore.errors import ConfigError
from flcore.executors import build_executor
from flcore.metrics.classification import (
    zero_shot_scores,
)
from flcore.progress import phase
from flcore.servers.evaluation import Evaluator
from flcore.servers.generator_quality import GeneratorQuality, score_generators
from flcore.servers.serverbase import ServerBase
from flcore.servers.strategies import build_strategy
from flcore.streams import Purpose, stream, stream_seed
from flcore.tracking import Trackers
from flcore.trainmodel.banks import Bank, bank_features, bank_from_decoder, new_bank
from flcore.trainmodel.generators import (
    EpochLog,
    GeneratorBank,
    SyntheticShare,
    generator_spec,
)
from flcore.trainmodel.vae import schedule_start, vae_loss
from flcore.visual.renderer import Renderer, RenderSet, needs_renderer, pick_per_class

log = logging.getLogger(__name__)

GENERATOR_SHAPE_KEYS = ("generator.model", "generator.likelihood", "generator.decoder_variance",
                        "generator.sequence_length",
                        "generator.latent_dim",
                        "generator.hidden_dim", "generator.conditional",
                        "generator.gaussian_covariance", "generator.gaussian_rank")


def labels_by_centroid(bank: Bank | None) -> bool:
    """Whether ``bank`` labels its draws by the nearest class centroid: an unconditional VAE
    with a generator of several classes (``generator.conditional=false``)."""
    return (isinstance(bank, GeneratorBank) and bank.model.cond == 0
            and any(len(c) > 1 for c in bank.spec.classes))


def generator_trainings(config: Config) -> int:
    """How many rounds of the run train generators (every ``generator.train_every``-th)."""
    return config.federation.rounds // config.generator.train_every


def _clone(state: StateDict) -> StateDict:
    return {k: v.detach().clone() for k, v in state.items()}


def _offload(tree: Any) -> Any:
    """Tensors of a state (or optimizer state) moved to the CPU."""
    if isinstance(tree, torch.Tensor):
        return tree.cpu()
    if isinstance(tree, dict):
        return {k: _offload(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_offload(v) for v in tree]
    return tree


def _generator_scalars(epochs: list[EpochLog], prefix: str) -> dict[str, float]:
    """The fix report's keys over the generators of ``epochs`` (one log per node): loss terms
    are means over generators, ``beta`` the mean of the nodes' betas (one schedule epoch a
    round, so they agree), ``weighted_kl`` the mean of each
    generator's own beta x KL, ``log_sigma2`` and ``effective_beta`` the means of each
    generator's decoder log-variance and KL weight relative to the calibrated ELBO, and the
    optimizer steps an epoch took (mean over nodes). Generators without rows (NaN) are left
    out."""
    def mean(values: list[torch.Tensor]) -> float:
        return float(torch.cat([v.flatten() for v in values]).nanmean())

    kl = mean([e.kl for e in epochs])
    return {f"{prefix}generator/recon_loss": mean([e.recon for e in epochs]),
            f"{prefix}generator/kl_loss": kl,
            f"{prefix}generator/beta": float(np.mean([e.beta for e in epochs])),
            f"{prefix}generator/weighted_kl": mean([e.beta * e.kl for e in epochs]),
            f"{prefix}generator/similarity_loss": mean([e.similarity for e in epochs]),
            f"{prefix}generator/mse": mean([e.mse for e in epochs]),
            f"{prefix}generator/log_sigma2": mean([e.log_sigma2 for e in epochs]),
            f"{prefix}generator/effective_beta": mean([e.effective_beta for e in epochs]),
            f"{prefix}generator/steps_per_epoch": float(np.mean([e.steps for e in epochs]))}


class ServerA2V(ServerBase):
    """Runs the A2V round: the strategy of ``federation.algorithm`` and
    ``server.adapter_training`` trains the global adapter from client adapters and synthetic
    samples; clients train generators every ``generator.train_every`` rounds; evaluation is
    zero-shot against the class prompts on val, test and each node's test clips."""

    def __init__(self, config: Config, clients: list[ClientA2V], shared: SharedTensors,
                 trackers: Trackers, run_dir: Path, checkpoint_extra: dict[str, Any]) -> None:
        super().__init__(config, clients, trackers, run_dir, checkpoint_extra)
        self.shared = shared
        self.algorithm = config.federation.algorithm
        self.strategy = build_strategy(config)
        torch.manual_seed(config.seed)
        self.model = build_adapter(shared, config.adapter)
        self.global_state = _clone(self.model.state_dict())
        self.loss = build_adapter_loss(shared, config.adapter)
        self.executor = build_executor(config, shared, self.loss, self.model)
        self.evaluator = Evaluator(self.model, shared, clients)
        self.renderer = (Renderer(config, shared, run_dir, trackers) if needs_renderer(config)
                         else None)
        self.node_states: dict[int, StateDict] = {}
        if self.strategy.stateful:
            for client in clients:
                client.model_state = _clone(self.global_state)
        g = config.generator
        self.generators_on = g.enabled
        self.generator_epochs = g.training_epochs * (
            generator_trainings(config) if g.schedule_scope is ScheduleScope.whole_run else 1)
        self.generator_rounds_done = 0
        self.synthetic: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pool: tuple[torch.Tensor, torch.Tensor] | None = None
        self.tstr_state = (_clone(self.global_state) if self.generators_on and
                           g.training_data is TrainingData.audio else None)
        self.server_bank: Bank | None = None
        self.epoch_history: list[dict[str, Any]] = []
        self.generator_seconds = 0.0
        self.quality: GeneratorQuality | None = None
        self.majority_shares: dict[str, float] = {}

    def is_generator_round(self, round_: int) -> bool:
        return self.generators_on and round_ % self.config.generator.train_every == 0

    def is_generator_scoring_round(self, round_: int) -> bool:
        """``gen/*`` rounds: every ``eval.generator_every`` and the last, for generators of
        audio embeddings (text-space samples have no held-out real rows to compare with)."""
        every = self.config.eval.generator_every
        return (self.generators_on and every > 0
                and self.config.generator.training_data is TrainingData.audio
                and (round_ % every == 0 or round_ == self.config.federation.rounds))

    def train_round(self, round_: int, selected: list[ClientA2V]) -> dict[str, float]:
        strategy = self.strategy
        strategy.begin_round()
        losses: list[float] = []
        generator_round = self.is_generator_round(round_)
        generator_logs: dict[int, list[EpochLog]] = {}
        trained: dict[int, StateDict] = {}
        rendering = self.renderer is not None and self.renderer.is_render_round(round_)
        if strategy.trains_clients:
            keep = (generator_round and self.config.generator.training_data
                    is TrainingData.adapter_output) or (rendering and self.config.images.nodes)
            for client, update in self.train_adapters(round_, selected):
                strategy.accept(self, client, update)
                losses.append(update.loss)
                if keep:
                    trained[client.node] = update.state
        if generator_round:
            self.train_client_generators(selected, round_, generator_logs, trained)
        strategy.conclude(self)
        metrics = {"train/clients": float(len(selected))}
        if losses:
            metrics["train/loss_mean"] = float(np.mean(losses))
        if generator_logs:
            metrics.update(self.log_generator_epochs(round_, generator_logs))
            self.generator_rounds_done += 1
        if generator_round and self.synthetic:
            self.pool = self.synthetic_pool(round_)
        metrics.update({f"{who}/synthetic/majority_share": v
                        for who, v in self.majority_shares.items()})
        if self.pool is not None:
            metrics.update(self.learn_from_synthetic(round_, *self.pool))
        if self.is_generator_scoring_round(round_) and self.synthetic:
            self.quality = score_generators(self.clients, self.synthetic, self.shared,
                                            self.config, round_)
            metrics.update(self.quality.scalars)
        if self.is_eval_round(round_):
            metrics.update(self.evaluate_all())
        if rendering and self.config.images.nodes:
            self.node_states = {n: _offload(state) for n, state in trained.items()}
        return metrics

    def after_checkpoint(self, round_: int) -> dict[str, float]:
        """Rendering rounds render after the checkpoint, so a failed render loses no round."""
        if self.renderer is None or not self.renderer.is_render_round(round_):
            return {}
        tic = time.perf_counter()
        metrics = self.render(round_, self.node_states)
        self.node_states = {}
        metrics["time/render_s"] = time.perf_counter() - tic
        return metrics

    def render(self, round_: int, trained: dict[int, StateDict]) -> dict[str, float]:
        """Render and judge ``images.per_class`` clips (or synthetic samples) per class and node
        with the global adapter and, with ``images.nodes``, each node's adapter: its own under
        ``local``, else the one it trained this round (``trained``)."""
        assert self.renderer is not None
        i = self.config.images
        stateful = self.strategy.stateful and self.algorithm is not Algorithm.centralized
        own = ({c.node: c.model_state for c in self.clients} if stateful else trained)
        prompt = i.source is ImageSource.prompt
        own_images = not prompt and (i.nodes or self.algorithm is Algorithm.local)
        node_states = own if own_images else {}
        global_state = None if self.algorithm is Algorithm.local else self.global_state
        sets: list[RenderSet] = []
        splits = ["synthetic"] if i.source is ImageSource.synthetic else i.splits
        for split in splits:
            picks = {c.node: self.render_picks(c, split) for c in self.clients}
            picks = {n: p for n, p in picks.items() if len(p[1])}
            if not picks:
                continue
            if global_state is not None or prompt:
                tokens, labels, nodes = (torch.cat(parts) for parts in zip(*(
                    (x, y, torch.full_like(y, n)) for n, (x, y) in picks.items()), strict=True))
                sets.append(RenderSet("global", split, global_state, tokens, labels, nodes))
            sets += [RenderSet(f"node{n}", split, node_states[n], x, y, torch.full_like(y, n))
                     for n, (x, y) in picks.items() if n in node_states]
        metrics = self.renderer.run(round_, self.model, sets)
        self.model.load_state_dict(self.global_state)
        return metrics

    def render_picks(self, client: ClientA2V, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Audio tokens and classes of the first ``images.per_class`` clips per class of
        ``client``'s ``split``, or of the synthetic samples it shared (``split=synthetic``)."""
        per_class = self.config.images.per_class
        if split == "synthetic":
            x, y = self.synthetic.get(client.node, (self.shared.tokens[:0],
                                                    self.shared.labels[:0]))
            rows = pick_per_class(torch.arange(len(y), device=y.device), y, per_class)
            return x[rows], y[rows]
        rows = pick_per_class(getattr(client, f"{split}_idx"), self.shared.labels, per_class)
        return self.shared.tokens[rows], self.shared.labels[rows]

    def train_adapters(self, round_: int, selected: list[ClientA2V]
                       ) -> Iterator[tuple[ClientA2V, LocalUpdate]]:
        """The selected clients' local training by the executor, each from the start the
        strategy gives it; a stateful client keeps its optimizer state (on the CPU when the run
        is on a GPU, so idle clients hold no device memory)."""
        f, strategy = self.config.federation, self.strategy
        jobs = [AdapterJob(c.node, c.train_idx, strategy.start(self, c),
                           c.optimizer_state if strategy.stateful else None,
                           training_seed(self.config.seed, round_, c.node),
                           f"node {c.node}, round {round_}") for c in selected]
        spec = RoundSpec(self.config.adapter, f.local_epochs, strategy.anchor(self),
                         f.fedprox_mu, strategy.stateful)
        updates = self.executor.train_adapters(jobs, spec)
        for client, update in phase(zip(selected, updates, strict=True),
                                    f"round {round_} clients", "client", len(selected)):
            if strategy.stateful:
                update.state = _offload(update.state)
                client.optimizer_state = _offload(update.optimizer_state)
            yield client, update

    def train_client_generators(self, selected: list[ClientA2V], round_: int,
                                logs: dict[int, list[EpochLog]],
                                trained: dict[int, StateDict]) -> None:
        """Train the selected clients' generators by the executor (on their audio embeddings,
        or on the outputs of the adapters they just trained, ``trained``) and keep what each
        shares."""
        tic = time.perf_counter()
        g = self.config.generator
        jobs = []
        for client in selected:
            adapter = None
            if g.training_data is TrainingData.adapter_output:
                self.model.load_state_dict(trained.get(client.node)
                                           or self.strategy.start(self, client))
                adapter = self.model
            jobs.append(client.generator_job(self.shared, g, round_, self.config.seed, adapter))
        banks = [client.generators for client in selected]
        epochs = self.executor.train_generators(
            banks, jobs, vae_loss(g, self.generator_epochs, schedule_start(g, round_)))
        for client, job, client_epochs in zip(selected, jobs, epochs, strict=True):
            if client_epochs:
                logs[client.node] = client_epochs
            x, y = self.receive(client.share_generators(job, g))
            if labels_by_centroid(client.generators):
                self.report_label_shares(f"node{client.node}", y)
            if len(x):
                self.synthetic[client.node] = (x, y)
            else:
                self.synthetic.pop(client.node, None)
        self.generator_seconds += time.perf_counter() - tic

    def report_label_shares(self, who: str, y: torch.Tensor) -> None:
        """Log the share of the centroid-labelled draws ``y`` of ``who`` (``node{i}`` or
        ``server``) per class: a collapsed generator puts nearly all of them in one class. The
        largest share becomes ``{who}/synthetic/majority_share``."""
        counts = torch.bincount(y, minlength=len(self.shared.class_names)).double()
        shares = counts / counts.sum().clamp(min=1)
        self.majority_shares[who] = float(shares.max())
        log.info("%s: share of centroid-labelled draws per class: %s", who, ", ".join(
            f"{self.shared.class_names[c]} {shares[c]:.2f}" for c in y.unique().tolist()))

    def log_generator_epochs(self, round_: int,
                             logs: dict[int, list[EpochLog]]) -> dict[str, float]:
        """One tracker row per generator epoch: means over all generators (``generator/*``)
        and over each node's (``node{i}/generator/*``), and each generator's decoder variance
        (``node{i}/generator/log_sigma2/{name}``); returns the last epoch's means.
        ``generator/epoch`` counts epochs over the run's generator rounds, so no two rows share
        one."""
        epochs = self.config.generator.training_epochs
        before = self.generator_rounds_done * epochs
        names = {c.node: c.generators.spec.names for c in self.clients if c.node in logs
                 and c.generators is not None}
        row: dict[str, float] = {}
        for e in range(epochs):
            row = {"generator/epoch": float(before + e + 1)}
            parts = {"": [log[e] for log in logs.values()]}
            parts.update({f"node{node}/": [log[e]] for node, log in logs.items()})
            for prefix, epoch_logs in parts.items():
                row.update(_generator_scalars(epoch_logs, prefix))
            for node, log in logs.items():
                row.update({f"node{node}/generator/log_sigma2/{name}": float(value)
                            for name, value in zip(names[node], log[e].log_sigma2.tolist(),
                                                   strict=True)})
            self.trackers.log_epoch(row, step=round_)
            self.epoch_history.append({"round": round_, **row})
        return {k: v for k, v in row.items() if k.startswith("generator/")}

    def synthetic_pool(self, round_: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The latest synthetic samples of every node, or, with server generators, samples of
        generators the server trained on them (as many per class as it received). Server
        generators of several classes follow ``generator.conditional``: conditioned on the class
        prompts, or labelled by the nearest centroid of the pooled samples (reported as
        ``server/synthetic/majority_share``)."""
        x = torch.cat([s[0] for s in self.synthetic.values()])
        y = torch.cat([s[1] for s in self.synthetic.values()])
        if self.config.server.generator.granularity is ServerGranularity.none:
            return x, y
        g = self.config.generator
        rows = x.reshape(len(x), -1)
        self.server_bank = self.server_bank or self.new_server_bank(rows.shape[1])
        prompts = self.shared.prompts if self.server_bank.model.cond else None
        seed = self.config.seed
        rngs = [stream(seed, round_=round_, node=0, generator=k,
                       purpose=Purpose.server_generator_training, device=rows.device)
                for k in range(self.server_bank.model.k)]
        self.server_bank.fit(rows, y, prompts,
                             vae_loss(g, self.generator_epochs, schedule_start(g, round_)), rngs,
                             where=f"server, round {round_}: ")
        present = y.unique().tolist()
        counts = {c: int((y == c).sum()) for c in present}
        centroids = {c: rows[y == c].mean(0) for c in present}
        sx, sy = self.server_bank.sample(counts, prompts, centroids, stream(
            seed, round_=round_, node=0, generator=0, purpose=Purpose.server_synthetic_samples))
        if labels_by_centroid(self.server_bank):
            self.report_label_shares("server", sy)
        return sx.reshape(len(sx), *x.shape[1:]), sy

    def federation_classes(self) -> list[int]:
        """Dataset ids of every class some node trains on (sorted)."""
        held = torch.cat([self.shared.labels[c.train_idx] for c in self.clients])
        return sorted(set(held.tolist()))

    def new_server_bank(self, features: int) -> Bank:
        """The server's generators over every class of the federation, so that a round whose
        sampled clients hold only some classes trains the same bank; conditioned on the class
        prompts as a node's generators of that granularity would be (:func:`condition_width`)."""
        g = self.config.generator
        granularity = Granularity(self.config.server.generator.granularity.value)
        spec = generator_spec(self.federation_classes(), self.shared.class_names,
                              granularity, g.class_groups)
        return new_bank(spec, features, g, condition_width(self.shared, g, granularity),
                        self.shared.tokens.device)

    def train_on(self, state: StateDict, x: torch.Tensor, y: torch.Tensor, round_: int,
                 which: int, anchor: StateDict | None = None, mu: float = 0.0) -> StateDict:
        """``state`` trained for ``server.synthetic_epochs`` on rows ``x`` with labels ``y``
        (seeded by training ``which`` of the round); with ``anchor``, plus the proximal pull
        ``mu / 2 * ||w - anchor||^2``."""
        def step_loss(net: torch.nn.Module, xb: torch.Tensor, yb: torch.Tensor,
                      key: torch.Tensor) -> torch.Tensor:
            pooled, sequence = net.outputs(xb, key)
            value = self.loss(pooled, yb, sequence)
            if anchor is not None and mu > 0:
                value = value + proximal_term(net, anchor, mu)
            return value

        self.model.load_state_dict(state)
        fit(self.model, step_loss, x, y, self.config.adapter, self.config.server.synthetic_epochs,
            stream_seed(self.config.seed, round_=round_, node=0, generator=which,
                        purpose=Purpose.server_adapter_training), f"server, round {round_}",
            progress=f"round {round_} server")
        return _clone(self.model.state_dict())

    def curate(self, state: StateDict, x: torch.Tensor, y: torch.Tensor, round_: int
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """The synthetic pool as fine-tuning data: classes whose generator failed dropped, the
        rest balanced to the median class count (seeded draws; with replacement only below
        it). A class failed when the adapter ``state`` recognises the nodes' real validation
        clips of it above chance but its synthetic samples no better than chance."""
        s = self.config.server
        classes = y.unique()
        kept = classes
        if s.skip_failed_classes:
            real = self.evaluator.class_recall(state, self.evaluator.merged("val"))
            fake = self.evaluator.class_recall(state, None, x, y)
            chance = 1 / len(self.shared.label_space)
            kept = classes[[not (real.get(c, 0.0) > chance >= fake[c])
                            for c in classes.tolist()]]
        info = {"synthetic/skipped_classes": float(len(classes) - len(kept))}
        if len(kept) == 0:
            return x[:0], y[:0], info
        rows = [torch.nonzero(y == c).flatten() for c in kept]
        if s.synthetic_balance:
            target = int(torch.tensor([len(r) for r in rows]).median())
            rng = stream(self.config.seed, round_=round_, node=0, generator=0,
                         purpose=Purpose.server_curation)
            rows = [r[torch.randperm(len(r), generator=rng)[:target].to(r.device)]
                    if len(r) >= target else
                    r[torch.randint(len(r), (target,), generator=rng).to(r.device)]
                    for r in rows]
        index = torch.cat(rows)
        return x[index], y[index], info

    def receive(self, share: SyntheticShare) -> tuple[torch.Tensor, torch.Tensor]:
        """A node's synthetic samples ``[m, S, D]``: as sent, or drawn from its decoders."""
        g = self.config.generator
        if share.decoder is None:
            x, y = share.x, share.y
        else:
            bank = bank_from_decoder(share.decoder, g, self.shared.tokens.device)
            prompts = self.shared.prompts if bank.model.cond else None
            x, y = bank.sample(share.counts, prompts, {}, share.rng)
        width = (self.shared.prompts.shape[-1] if g.training_data is TrainingData.adapter_output
                 else self.shared.tokens.shape[-1])
        return x.reshape(len(x), g.sequence_length, width), y

    def distill(self, x: torch.Tensor, y: torch.Tensor,
                teachers: list[tuple[torch.Tensor, StateDict]], round_: int) -> StateDict:
        """Knowledge distillation into the global adapter: each synthetic sample's target is the
        mean output of the round's client adapters that hold its class (MSE + cosine), and for
        an adapter with a sequence head the mean of their sequences too (the sequence loss)."""
        sequences = self.model.has_sequence
        total = torch.zeros(len(x), self.shared.prompts.shape[1], device=x.device)
        total_sequence = (torch.zeros(len(x), *self.model.sequence.base.shape, device=x.device)
                          if sequences else None)
        count = torch.zeros(len(x), device=x.device)
        for held, state in teachers:
            mask = torch.isin(y, held)
            self.model.load_state_dict(state)
            self.model.eval()
            with torch.no_grad():
                pooled, sequence = self.model.outputs(x[mask])
                total[mask] += pooled
                if total_sequence is not None:
                    total_sequence[mask] += sequence
            count[mask] += 1
        keep = count > 0
        targets = total[keep] / count[keep, None]
        target_sequences = (None if total_sequence is None
                            else total_sequence[keep] / count[keep, None, None])
        a, loss = self.config.adapter, self.loss

        def step_loss(net: torch.nn.Module, xb: torch.Tensor, rows: torch.Tensor,
                      key: torch.Tensor) -> torch.Tensor:
            out, sequence = net.outputs(xb, key)
            target = targets[rows]
            cosine = 1 - torch.nn.functional.cosine_similarity(out, target, dim=-1).mean()
            value = a.mse_weight * torch.nn.functional.mse_loss(out, target) + (
                a.cosine_weight * cosine)
            if target_sequences is not None:
                error = torch.nn.functional.mse_loss(sequence, target_sequences[rows])
                value = value + loss.sequence_weight * loss.sequence_scale * error
            return value

        self.model.load_state_dict(self.global_state)
        rows = torch.arange(int(keep.sum()), device=x.device)
        fit(self.model, step_loss, x[keep], rows, a, self.config.server.synthetic_epochs,
            stream_seed(self.config.seed, round_=round_, node=0, generator=0,
                        purpose=Purpose.server_distillation), f"server, round {round_}",
            progress=f"round {round_} server")
        return _clone(self.model.state_dict())

    def learn_from_synthetic(self, round_: int, x: torch.Tensor,
                             y: torch.Tensor) -> dict[str, float]:
        """The strategy's use of the synthetic pool for the global adapter, and the
        synthetic-only adapter behind ``synthetic/acc`` (train on synthetic, test on real)."""
        metrics = {"synthetic/samples": float(len(x))}
        if self.config.generator.training_data is TrainingData.adapter_output:
            scores = zero_shot_scores(x.mean(1), self.shared.prompts[self.shared.label_space])
            position = torch.searchsorted(self.shared.label_space, y)
            metrics["synthetic/prompt_acc"] = (scores.argmax(1) == position).double().mean().item()
            return metrics
        metrics.update(self.strategy.learn(self, round_, x, y))
        assert self.tstr_state is not None
        self.tstr_state = (self.global_state if self.strategy.global_is_synthetic_only
                           else self.train_on(self.tstr_state, x, y, round_, 2))
        return metrics

    def load_generators(self, folder: str, config_now: dict[str, Any]) -> None:
        """Start from the generators of an earlier run (``generator.load_from``): the latest
        checkpoint of ``folder``, refused unless its encoder, generator shapes and every node's
        generator classes match this run. Their ``whole_run`` schedule restarts with this run."""
        if not checkpoint.checkpoints(Path(folder)):
            raise ConfigError(f"generator.load_from={folder}: no checkpoint there; point it at "
                              "the folder of a run that saved checkpoints")
        saved = checkpoint.load_latest(Path(folder))
        old, new = checkpoint.flatten(saved["config"]), checkpoint.flatten(config_now)
        keys = [k for k in new if k.startswith("audio_encoder.") or k in GENERATOR_SHAPE_KEYS]
        for key in keys:
            if old.get(key) != new[key]:
                raise ConfigError(f"generator.load_from={folder}: its generators were trained "
                                  f"with {key}={old.get(key)}, this run has {new[key]}")
        banks = saved["server"].get("generators", {})
        for client in self.clients:
            state = banks.get(str(client.node))
            if state is None:
                raise ConfigError(f"generator.load_from={folder}: no generators for node "
                                  f"{client.node} there")
            bank = client.new_generators(self.shared, self.config.generator)
            if isinstance(bank, GeneratorBank) and "dec_sigma2" not in state["model"]:
                raise ConfigError(f"generator.load_from={folder}: its generators predate the "
                                  "stored decoder variance (generator.sample_noise); train "
                                  "them again with this version")
            if state["names"] != bank.spec.names:
                raise ConfigError(f"generator.load_from={folder}: node {client.node}'s "
                                  f"generators there model {', '.join(state['names'])}; here "
                                  f"it needs {', '.join(bank.spec.names)}")
            bank.load_state_dict(state)
            bank.trainings = 0
            client.generators = bank

    def evaluate_all(self) -> dict[str, float]:
        """The round's zero-shot evaluation (:meth:`Evaluator.scores`). Every node is scored,
        sampled this round or not, with the adapter it holds now: the global one, or under
        ``local`` its own (then ``global/*`` and ``val/*`` are means over the nodes'
        adapters)."""
        per_node = self.algorithm is not Algorithm.centralized
        states = ([c.model_state for c in self.clients] if self.strategy.stateful and per_node
                  else [self.global_state])
        return self.evaluator.scores(states, per_node,
                                     self.tstr_state if self.pool is not None else None)

    def final_report(self, class_names: list[str]) -> tuple[dict[str, float], np.ndarray] | None:
        """Per-class accuracy and the confusion matrix of the global adapter on the merged test
        splits (None for ``local``, which has no global adapter)."""
        if self.algorithm is Algorithm.local:
            return None
        return self.evaluator.final_report(self.global_state, class_names)

    def state_dict(self, optimizers: bool = True) -> dict[str, Any]:
        """Everything a resume needs; ``optimizers=False`` leaves out optimizer states (smaller,
        but a resume from it could not be exact)."""
        state: dict[str, Any] = {"global": self.global_state}
        if optimizers:
            state["strategy"] = self.strategy.state_dict()
        if self.strategy.stateful:
            state["clients"] = {str(c.node): {"model": c.model_state,
                                              **({"optimizer": c.optimizer_state}
                                                 if optimizers else {})}
                                for c in self.clients}
        if self.generators_on:
            def bank(b: Bank) -> dict[str, Any]:
                saved = b.state_dict()
                return saved if optimizers else {k: v for k, v in saved.items()
                                                 if k != "optimizer"}

            state["generators"] = {str(c.node): bank(c.generators)
                                   for c in self.clients if c.generators is not None}
            state["synthetic"] = {str(node): list(pair) for node, pair in self.synthetic.items()}
            state["tstr_state"] = self.tstr_state
            state["epoch_history"] = self.epoch_history
            state["generator_seconds"] = self.generator_seconds
            state["generator_rounds_done"] = self.generator_rounds_done
            state["majority_shares"] = dict(self.majority_shares)
            if self.server_bank is not None:
                state["server_generators"] = bank(self.server_bank)
                state["pool"] = list(self.pool) if self.pool is not None else None
        return state

    def load_adapters(self, state: dict[str, Any]) -> None:
        """What rendering a saved round needs from its checkpoint (``state_dict``): the global
        adapter, the nodes' own (stateful strategies) and the synthetic samples received."""
        device = self.shared.tokens.device
        self.global_state = {k: v.to(device) for k, v in state["global"].items()}
        if self.strategy.stateful:
            for client in self.clients:
                client.model_state = {k: v.to(device) for k, v in
                                      state["clients"][str(client.node)]["model"].items()}
        self.synthetic = {int(node): (x.to(device), y.to(device))
                          for node, (x, y) in state.get("synthetic", {}).items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.shared.tokens.device

        def to(tensors: StateDict) -> StateDict:
            return {k: v.to(device) for k, v in tensors.items()}

        self.global_state = to(state["global"])
        self.strategy.load_state_dict(state["strategy"], device)
        if self.strategy.stateful:
            for client in self.clients:
                saved = state["clients"][str(client.node)]
                client.model_state = to(saved["model"])
                client.optimizer_state = saved["optimizer"]
        if not self.generators_on:
            return
        for client in self.clients:
            if str(client.node) in state["generators"]:
                client.generators = client.new_generators(self.shared, self.config.generator)
                client.generators.load_state_dict(state["generators"][str(client.node)])
        self.synthetic = {int(node): (x.to(device), y.to(device))
                          for node, (x, y) in state["synthetic"].items()}
        if state["tstr_state"] is not None:
            self.tstr_state = to(state["tstr_state"])
        self.epoch_history = list(state["epoch_history"])
        self.generator_seconds = state["generator_seconds"]
        self.generator_rounds_done = state["generator_rounds_done"]
        self.majority_shares = dict(state["majority_shares"])
        if "server_generators" in state:
            self.server_bank = self.new_server_bank(bank_features(state["server_generators"]))
            self.server_bank.load_state_dict(state["server_generators"])
            if state["pool"] is not None:
                self.pool = (state["pool"][0].to(device), state["pool"][1].to(device))
        elif self.synthetic:
            self.pool = (torch.cat([s[0] for s in self.synthetic.values()]),
                         torch.cat([s[1] for s in self.synthetic.values()]))
