"""Range checks of each config section, and the rules between keys, each refusing with one
line that names the key, the value and what is allowed (:func:`~flcore.config.rules.require`).
How the federation learns (rounds, aggregation, the server's adapter training, privacy) is
checked in :mod:`flcore.config.algorithm_checks`."""

import re
from pathlib import Path

from flcore.choices import (
    AdapterTraining,
    Algorithm,
    DatasetName,
    DecoderVariance,
    ExecutorName,
    GaussianCovariance,
    GeneratorModel,
    Granularity,
    ImageSource,
    Likelihood,
    PipelineName,
    Precision,
    ServerGranularity,
    ShareMode,
    SplitKind,
    TextEncoderName,
    TextOutput,
    TrainingData,
)
from flcore.config.rules import require
from flcore.config.schema import (
    AdapterConfig,
    AudioEncoderConfig,
    CheckpointConfig,
    Config,
    DatasetConfig,
    EmbeddingsConfig,
    EvalConfig,
    ExecutorConfig,
    FederationConfig,
    GeneratorConfig,
    SyntheticConfig,
    TextEncoderConfig,
)

ADAPTER_LOSSES = ("mse", "cosine", "mse+cosine", "contrastive")
IMAGE_SPLITS = ("test", "val")
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def check_run(config: Config) -> None:
    """The top-level keys: seed, device, name and threads."""
    require(config.seed >= 0, "seed", config.seed, "must be >= 0")
    require(bool(_DEVICE.match(config.device)), "device", config.device,
             "must be auto, cpu, cuda or cuda:N")
    require(bool(config.name.strip()), "name", repr(config.name), "must not be empty")
    require(config.threads is None or config.threads >= 1, "threads", config.threads,
             "must be >= 1, or null for this process's share of the CPUs")


def _check_synthetic(s: SyntheticConfig) -> None:
    """Range checks of ``dataset.synthetic``: every fold must get a recording of every class."""
    require(1 <= s.clips_per_source <= 26, "dataset.synthetic.clips_per_source",
             s.clips_per_source, "must be in [1, 26] (takes are named A to Z)")
    require(len(s.fold_weights) == 5 and all(w >= 1 for w in s.fold_weights),
             "dataset.synthetic.fold_weights", s.fold_weights,
             "must be 5 integers >= 1 (the relative number of recordings in folds 1 to 5)")
    need = s.clips_per_source * sum(s.fold_weights)
    require(s.clips_per_class >= need, "dataset.synthetic.clips_per_class", s.clips_per_class,
             f"must be >= {need} (clips_per_source x the sum of fold_weights: one recording per "
             "fold at least)")
    require(1 <= s.duration_s <= 60, "dataset.synthetic.duration_s", s.duration_s,
             "must be in [1, 60]")
    require(8000 <= s.sample_rate <= 48000, "dataset.synthetic.sample_rate", s.sample_rate,
             "must be in [8000, 48000]")
    require(len(s.snr_db) == 2 and -20 <= s.snr_db[0] <= s.snr_db[1] <= 60,
             "dataset.synthetic.snr_db", s.snr_db,
             "must be [low, high] with -20 <= low <= high <= 60")
    require(not s.background_db or (len(s.background_db) == 2
                                     and -60 <= s.background_db[0] <= s.background_db[1] <= 0),
             "dataset.synthetic.background_db", s.background_db,
             "must be [] (no background) or [low, high] with -60 <= low <= high <= 0")


def check_dataset(d: DatasetConfig) -> None:
    if d.name is DatasetName.esc50:
        require(d.root is not None, "dataset.root", d.root,
                 "dataset.name=esc50 needs the ESC-50 folder (git clone of karolpiczak/ESC-50, "
                 "or its ESC-50-master zip); or run on the bundled data with dataset=synthetic")
    if d.name is DatasetName.folder:
        require(d.root is not None or d.csv is not None, "dataset.root", d.root,
                 "dataset.name=folder needs a folder of class folders (dataset.root) or a "
                 "filename,label[,split][,group] CSV (dataset.csv)")
    else:
        require(d.csv is None, "dataset.csv", d.csv,
                 "applies to dataset.name=folder only; set dataset=folder or drop it")
    require(d.clip_seconds is None or 0 < d.clip_seconds <= 3600, "dataset.clip_seconds",
             d.clip_seconds, "must be null (no stated length) or in (0, 3600]")
    require(not d.strict or d.clip_seconds is not None, "dataset.strict", d.strict,
             "refuses clips shorter than dataset.clip_seconds, which is null; set it")
    _check_synthetic(d.synthetic)
    if d.split is SplitKind.folds:
        require(len(d.train_folds) > 0, "dataset.train_folds", d.train_folds,
                 "must name at least one fold")
        require(len(d.test_folds) > 0, "dataset.test_folds", d.test_folds,
                 "must name at least one fold")
        seen: dict[int, str] = {}
        for key in ("train_folds", "val_folds", "test_folds"):
            for fold in getattr(d, key):
                require(fold not in seen, f"dataset.{key}", getattr(d, key),
                         f"fold {fold} is also in dataset.{seen.get(fold)} (splits are disjoint)")
                seen[fold] = key
    else:
        require(0 < d.train_ratio < 1, "dataset.train_ratio", d.train_ratio, "must be in (0, 1)")
        require(0 <= d.val_ratio < 1, "dataset.val_ratio", d.val_ratio, "must be in [0, 1)")
        require(d.train_ratio + d.val_ratio < 1, "dataset.val_ratio", d.val_ratio,
                 f"dataset.train_ratio + dataset.val_ratio must be < 1 (the rest is the test "
                 f"split), got {d.train_ratio + d.val_ratio:g}")


def check_encoders(a: AudioEncoderConfig, t: TextEncoderConfig) -> None:
    require(1 <= a.tokens <= 512, "audio_encoder.tokens", a.tokens, "must be in [1, 512]")
    require(a.batch_size >= 1, "audio_encoder.batch_size", a.batch_size, "must be >= 1")
    require(a.threads >= 0, "audio_encoder.threads", a.threads, "must be >= 0 (0 = all cores)")
    require(1 <= a.n_mfcc <= 128, "audio_encoder.n_mfcc", a.n_mfcc, "must be in [1, 128]")
    require("{name}" in t.prompt, "text_encoder.prompt", repr(t.prompt),
             "must contain {name}, where the class name goes")
    require(t.max_length >= 2, "text_encoder.max_length", t.max_length, "must be >= 2")


def check_embeddings(e: EmbeddingsConfig) -> None:
    require(e.workers >= 0, "embeddings.workers", e.workers,
             "must be >= 0 (0 = embed in the run's own process)")
    require(e.shard_size >= 1, "embeddings.shard_size", e.shard_size,
             "must be >= 1 (clips per cache shard)")


def check_adapter(a: AdapterConfig) -> None:
    require(a.sequence_weight >= 0, "adapter.sequence_weight", a.sequence_weight,
             "must be >= 0")
    require(a.hidden_dim >= 1, "adapter.hidden_dim", a.hidden_dim, "must be >= 1")
    require(a.n_latents >= 1, "adapter.n_latents", a.n_latents, "must be >= 1")
    require(a.num_heads >= 1, "adapter.num_heads", a.num_heads, "must be >= 1")
    require(0 <= a.dropout < 1, "adapter.dropout", a.dropout, "must be in [0, 1)")
    require(a.loss in ADAPTER_LOSSES, "adapter.loss", a.loss,
             f"must be one of {', '.join(ADAPTER_LOSSES)}")
    require(a.mse_weight >= 0, "adapter.mse_weight", a.mse_weight, "must be >= 0")
    require(a.cosine_weight >= 0, "adapter.cosine_weight", a.cosine_weight, "must be >= 0")
    require(a.temperature > 0, "adapter.temperature", a.temperature, "must be > 0")
    require(a.lr > 0, "adapter.lr", a.lr, "must be > 0")
    require(a.weight_decay >= 0, "adapter.weight_decay", a.weight_decay, "must be >= 0")
    require(a.batch_size >= 1, "adapter.batch_size", a.batch_size, "must be >= 1")
    require(a.grad_clip >= 0, "adapter.grad_clip", a.grad_clip, "must be >= 0 (0 = off)")


#: The executors each executor key applies to; set under another it is refused, not ignored.
EXECUTOR_KEYS = {"clients_per_batch": (ExecutorName.batched, ExecutorName.ray),
                 **{key: (ExecutorName.ray,) for key in ("num_cpus", "num_gpus", "address",
                                                        "connect_timeout_s", "max_retries")}}


def check_executor(x: ExecutorConfig) -> None:
    default = ExecutorConfig()
    for key, users in EXECUTOR_KEYS.items():
        named = " and ".join(f"executor={u.value}" for u in users)
        require(x.name in users or getattr(x, key) == getattr(default, key), f"executor.{key}",
                 getattr(x, key), f"applies to {named} only, not executor={x.name.value}; "
                 "drop it")
    require(x.clients_per_batch >= 1, "executor.clients_per_batch", x.clients_per_batch,
             "must be >= 1")
    require(x.num_cpus > 0, "executor.num_cpus", x.num_cpus, "must be > 0 (fractions allowed)")
    require(x.num_gpus >= 0, "executor.num_gpus", x.num_gpus,
             "must be >= 0 (fractions allowed)")
    require(x.connect_timeout_s > 0, "executor.connect_timeout_s", x.connect_timeout_s,
             "must be > 0")
    require(x.max_retries >= 0, "executor.max_retries", x.max_retries, "must be >= 0")
    require(x.address is None or x.address == "auto"
             or re.fullmatch(r"(ray://)?[^:/]\S*:\d+", x.address) is not None,
             "executor.address", x.address, "must be null (a local Ray), auto (the cluster this "
             "machine belongs to) or host:port of a Ray head")


def check_federation(f: FederationConfig) -> None:
    """Who holds what: explicit node lists or the generated partition."""
    if f.nodes is not None:
        require(len(f.nodes) > 0, "federation.nodes", f.nodes,
                 "must list at least one node, or be null to use federation.partition")
        for i, node in enumerate(f.nodes):
            require(len(node.classes) > 0, f"federation.nodes[{i}].classes", node.classes,
                     "must name at least one class")
            require(len(set(node.classes)) == len(node.classes),
                     f"federation.nodes[{i}].classes", node.classes, "lists a class twice")
        return
    p = f.partition
    require(p.num_nodes >= 1, "federation.partition.num_nodes", p.num_nodes, "must be >= 1")
    require(p.classes_per_node >= 1, "federation.partition.classes_per_node",
             p.classes_per_node, "must be >= 1")
    require(p.alpha > 0, "federation.partition.alpha", p.alpha, "must be > 0")
    require(p.min_samples_per_node >= 1, "federation.partition.min_samples_per_node",
             p.min_samples_per_node, "must be >= 1")
    require(p.max_retries >= 1, "federation.partition.max_retries", p.max_retries,
             "must be >= 1")


def check_generator(g: GeneratorConfig) -> None:
    if g.gaussian_covariance is GaussianCovariance.low_rank:
        require(g.gaussian_rank >= 1, "generator.gaussian_rank", g.gaussian_rank,
                 "generator.gaussian_covariance=low_rank needs a rank >= 1")
    else:
        require(g.gaussian_rank == 0, "generator.gaussian_rank", g.gaussian_rank,
                 "only generator.gaussian_covariance=low_rank has a rank; set it to 0")
    if g.model is not GeneratorModel.gaussian:
        require(g.gaussian_covariance is GaussianCovariance.diagonal,
                 "generator.gaussian_covariance", g.gaussian_covariance,
                 "applies to generator.model=gaussian only")
    if g.model is not GeneratorModel.vae:
        closed_form = f"generator.model={g.model.value} is fitted in closed form (drop it)"
        require(g.likelihood is Likelihood.gaussian, "generator.likelihood", g.likelihood,
                 f"is a VAE loss; {closed_form}")
        require(g.free_bits == 0, "generator.free_bits", g.free_bits,
                 f"is a VAE loss term; generator.model={g.model.value} has no latent code "
                 "(drop it)")
        require(g.decoder_variance is DecoderVariance.optimal, "generator.decoder_variance",
                 g.decoder_variance, f"is a VAE decoder setting; {closed_form}")
        require(g.precision is Precision.fp32, "generator.precision", g.precision,
                 f"applies to VAE training; {closed_form}")
    require(g.training_epochs >= 1, "generator.training_epochs", g.training_epochs,
             "must be >= 1")
    require(0 < g.beta_warmup_ratio <= 1, "generator.beta_warmup_ratio", g.beta_warmup_ratio,
             "must be in (0, 1]")
    require(g.beta_max > 0, "generator.beta_max", g.beta_max, "must be > 0")
    require(g.n_cycles >= 1, "generator.n_cycles", g.n_cycles, "must be >= 1")
    require(0 < g.cycle_ratio <= 1, "generator.cycle_ratio", g.cycle_ratio, "must be in (0, 1]")
    require(g.similarity_weight >= 0, "generator.similarity_weight", g.similarity_weight,
             "must be >= 0")
    require(g.variance_floor > 0, "generator.variance_floor", g.variance_floor, "must be > 0")
    require(g.decoder_variance is DecoderVariance.optimal or g.likelihood is Likelihood.gaussian,
             "generator.decoder_variance", g.decoder_variance,
             "learned applies to generator.likelihood=gaussian only (use optimal)")
    require(g.variance_lr > 0, "generator.variance_lr", g.variance_lr, "must be > 0")
    require(g.free_bits >= 0, "generator.free_bits", g.free_bits,
             "must be >= 0 (nats per latent dimension; 0 = off)")
    for key in ("sequence_length", "latent_dim", "hidden_dim", "batch_size", "train_every"):
        require(getattr(g, key) >= 1, f"generator.{key}", getattr(g, key), "must be >= 1")
    require(g.lr > 0, "generator.lr", g.lr, "must be > 0")
    require(g.grad_clip >= 0, "generator.grad_clip", g.grad_clip, "must be >= 0 (0 = off)")
    require(g.augmentation_noise >= 0, "generator.augmentation_noise", g.augmentation_noise,
             "must be >= 0")
    n = g.synthetic_samples_per_class
    require(n == "auto" or (n.lstrip("-").isdigit() and int(n) > 0),
             "generator.synthetic_samples_per_class", n,
             "must be a positive integer or auto (= the node's training clips per class)")
    owner: dict[str, str] = {}
    for group, classes in g.class_groups.items():
        for name in classes:
            require(name not in owner, f"generator.class_groups.{group}", classes,
                     f"class '{name}' is already in group '{owner.get(name)}'")
            owner[name] = group


def check_load_from(folder: str) -> None:
    """The run folder whose checkpoint the generators start from exists and has one (else the
    checkpoint loader's error would blame resume=true)."""
    require(Path(folder).is_dir(), "generator.load_from", folder,
             "no such folder; give the folder of an earlier run (it holds checkpoints/)")
    require(any((Path(folder) / "checkpoints").glob("round_*.pt")), "generator.load_from",
             folder, "has no checkpoints/round_*.pt; give the folder of one earlier run that "
             "saved checkpoints")


def check_eval(e: EvalConfig) -> None:
    require(e.generator_every >= 0, "eval.generator_every", e.generator_every,
             "must be >= 0 (0 = never score generators)")
    require(e.prdc_k >= 1, "eval.prdc_k", e.prdc_k, "must be >= 1")
    require(e.mmd_permutations >= 0, "eval.mmd_permutations", e.mmd_permutations,
             "must be >= 0 (0 = no p-value)")
    require(e.max_rows >= 2, "eval.max_rows", e.max_rows, "must be >= 2")
    require(e.privacy_every >= 0, "eval.privacy_every", e.privacy_every,
             "must be >= 0 (0 = no membership-inference audit)")


def check_checkpoint(c: CheckpointConfig) -> None:
    require(c.every >= 0, "checkpoint.every", c.every, "must be >= 0 (0 = no checkpoints)")
    require(c.keep_last >= 1, "checkpoint.keep_last", c.keep_last, "must be >= 1")


def check_generator_use(config: Config) -> None:
    """What the generators' granularity, sharing and training data need of the rest: class
    groups, conditional decoders, and an adapter training that takes their samples."""
    g, s = config.generator, config.server
    overrides = [n.granularity for n in config.federation.nodes or [] if n.granularity]
    for granularity in [g.granularity, *overrides]:
        if granularity is Granularity.per_group:
            require(len(g.class_groups) > 0, "generator.class_groups", "{}",
                     "generator.granularity=per_group needs groups: {group: [classes]}")
        if g.share is ShareMode.decoder:
            require(granularity is Granularity.per_class or g.conditional, "generator.share",
                     "decoder", f"a {granularity.value} unconditional decoder cannot label its "
                     "samples; use per_class generators or generator.conditional=true")
    if g.training_data is TrainingData.adapter_output:
        require(s.adapter_training is AdapterTraining.fedavg, "generator.training_data",
                 "adapter_output", "samples in the text space cannot train an audio adapter; "
                 "set server.adapter_training=fedavg")
    if s.generator.granularity is ServerGranularity.per_group:
        require(len(g.class_groups) > 0, "generator.class_groups", "{}",
                 "server.generator.granularity=per_group needs groups: {group: [classes]}")


#: The text encoder each pipeline's conditioning comes from, and what that conditioning is.
PIPELINE_TEXT_ENCODERS = {
    PipelineName.sd: (TextEncoderName.clip, "CLIP token sequences (77 x 768 for SD 1.x)"),
    PipelineName.flux: (TextEncoderName.clip_t5, "a CLIP pooled embedding and T5 token sequences"),
}


def check_images(config: Config) -> None:
    """Ranges of ``images.*``, and a pipeline whose conditioning the text encoder and adapter
    can produce."""
    i, t = config.images, config.text_encoder
    if i.pipeline is PipelineName.none:
        return
    name, gives = PIPELINE_TEXT_ENCODERS[i.pipeline]
    works = (f"use text_encoder={name.value} text_encoder.output=sequence (with text_encoder.path "
             f"the pipeline folder, as in +experiment=synthetic_{i.pipeline.value})")
    require(t.name is name and t.output is TextOutput.sequence, "images.pipeline", i.pipeline,
             f"it is conditioned on {gives}, which text_encoder={t.name.value} "
             f"text_encoder.output={t.output.value} does not produce; {works}")
    if i.pipeline is PipelineName.sd:
        require(t.max_length == 77, "text_encoder.max_length", t.max_length,
                 "images.pipeline=sd attends to 77 CLIP tokens; set it to 77")
    require(i.path is not None, "images.path", None,
             f"images.pipeline={i.pipeline.value} needs the pipeline's weights: a local folder "
             "saved with save_pretrained, or a model id in the local Hugging Face cache")
    require(i.every >= 0, "images.every", i.every,
             "must be >= 0 (0 = after the last round only)")
    require(len(i.splits) > 0 and all(s in IMAGE_SPLITS for s in i.splits), "images.splits",
             i.splits, f"must be a non-empty list of {', '.join(IMAGE_SPLITS)}")
    require(i.per_class >= 1, "images.per_class", i.per_class, "must be >= 1")
    require(i.steps >= 1, "images.steps", i.steps, "must be >= 1")
    require(i.guidance >= 0, "images.guidance", i.guidance, "must be >= 0")
    step = 16 if i.pipeline is PipelineName.flux else 8  # the VAE's, times Flux's 2x2 patches
    for key, value in (("images.height", i.height), ("images.width", i.width)):
        require(value >= step and value % step == 0, key, value,
                 f"must be a multiple of {step} for images.pipeline={i.pipeline.value}")
    require(i.batch_size >= 1, "images.batch_size", i.batch_size, "must be >= 1")
    require(0 <= i.log_limit <= 50, "images.log_limit", i.log_limit,
             "must be in [0, 50] (images logged to the tracker per round; all are saved)")
    require("{name}" in i.judge_prompt, "images.judge_prompt", repr(i.judge_prompt),
             "must contain {name}, where the class name goes")
    if i.source is ImageSource.synthetic:
        g = config.generator
        require(g.enabled and g.training_data is TrainingData.audio, "images.source",
                 i.source, "renders generator samples of audio embeddings through the adapter; "
                 "it needs generators (generator!=none) with generator.training_data=audio")
    if i.nodes:
        require(config.federation.algorithm is not Algorithm.centralized, "images.nodes",
                 True, "federation.algorithm=centralized has no nodes to render for")
        require(config.server.adapter_training is not AdapterTraining.synthetic, "images.nodes",
                 True, "server.adapter_training=synthetic trains no node adapters to render with")
