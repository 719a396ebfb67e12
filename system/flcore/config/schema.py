"""The config's dataclass schemas: every key, its type and its default, in one place.

``configs/`` composes onto these (Hydra rejects unknown keys and wrong types while composing);
:mod:`flcore.config.checks` holds the ranges and the rules between keys.
"""

from dataclasses import dataclass, field

from omegaconf import MISSING

from flcore.choices import (
    AdapterTraining,
    Aggregation,
    Algorithm,
    AudioEncoderName,
    BetaSchedule,
    DatasetName,
    DecoderVariance,
    ExecutorName,
    GaussianCovariance,
    GeneratorModel,
    Granularity,
    ImageDtype,
    ImageSource,
    KlReduction,
    LabelSpace,
    Likelihood,
    LrSchedule,
    OnBadFile,
    OnNan,
    PartitionKind,
    PipelineName,
    Precision,
    ScheduleScope,
    ServerGranularity,
    ShareMode,
    SplitKind,
    TextEncoderName,
    TextOutput,
    TrainingData,
    WandbMode,
)

# The default of server.adapter_training: it follows the generators and the algorithm through
# the resolver ``feda2v.default_adapter_training`` (:mod:`flcore.config.store`), which OmegaConf
# calls when the config is resolved and whose answer it converts to the enum; a value the user
# sets wins.
ADAPTER_TRAINING_DEFAULT = (
    "${feda2v.default_adapter_training:${generator.enabled},${federation.algorithm}}")


@dataclass
class SyntheticConfig:
    """The bundled synthetic dataset, generated into the cache on first use (defaults: the hard
    benchmark of ``dataset=synthetic``; ``dataset=synthetic_small`` is the easy set)."""

    clips_per_class: int = 72
    clips_per_source: int = 4
    fold_weights: list[int] = field(default_factory=lambda: [1, 1, 1, 1, 5])
    duration_s: float = 2.5
    sample_rate: int = 16000
    snr_db: list[float] = field(default_factory=lambda: [5.0, 25.0])
    background_db: list[float] = field(default_factory=lambda: [-18.0, -6.0])
    room: bool = True
    seed: int = 0


@dataclass
class DatasetConfig:
    """Which clips exist and how they split into train / val / test."""

    name: DatasetName = DatasetName.synthetic
    root: str | None = None
    split: SplitKind = SplitKind.folds
    train_folds: list[int] = field(default_factory=lambda: [1, 2, 3])
    val_folds: list[int] = field(default_factory=lambda: [4])
    test_folds: list[int] = field(default_factory=lambda: [5])
    train_ratio: float = 0.7
    val_ratio: float = 0.1
    on_bad_file: OnBadFile = OnBadFile.error
    clip_seconds: float | None = None
    strict: bool = False
    csv: str | None = None
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class AudioEncoderConfig:
    """Audio clips to token sequences ``[N, tokens, D]`` (keys marked per encoder)."""

    name: AudioEncoderName = AudioEncoderName.yamnet
    tokens: int = 8
    batch_size: int = 32
    threads: int = 0
    n_mfcc: int = 40
    deltas: bool = True
    path: str | None = None
    model_id: str = "MIT/ast-finetuned-audioset-10-10-0.4593"
    cls_only: bool = False


@dataclass
class TextEncoderConfig:
    """One prompt per class to ``[C, D]`` (pooled), plus ``[C, T, D]`` token sequences as
    conditioning targets when ``output=sequence``."""

    name: TextEncoderName = TextEncoderName.minilm
    prompt: str = "the sound of {name}"
    output: TextOutput = TextOutput.pooled
    max_length: int = 77
    path: str | None = None
    model_id: str = "openai/clip-vit-base-patch32"


@dataclass
class EmbeddingsConfig:
    """The on-disk cache of audio and text embeddings."""

    cache: bool = True
    cache_dir: str = "${cache_dir}/embeddings"
    workers: int = 0
    shard_size: int = 256


@dataclass
class NodeConfig:
    """One node of an explicit federation: the classes whose clips it holds, and optionally its
    own generator granularity (else ``generator.granularity``)."""

    classes: list[str] = MISSING
    granularity: Granularity | None = None


@dataclass
class PartitionConfig:
    """A generated assignment of classes and clips to nodes (used when ``nodes`` is null)."""

    kind: PartitionKind = PartitionKind.classes_per_node
    num_nodes: int = 5
    classes_per_node: int = 2
    alpha: float = 0.5
    min_samples_per_node: int = 1
    max_retries: int = 100


@dataclass
class FedGenConfig:
    """FedGen's server generator (Zhu et al. 2021): noise and a class to lifted adapter tokens,
    learned from the round's client heads and broadcast to regularise local training."""

    alpha: float = 1.0
    noise_dim: int = 32
    hidden_dim: int = 256
    tokens: int = 4
    batch_size: int = 32
    server_steps: int = 100
    lr: float = 0.001
    diversity_weight: float = 1.0


@dataclass
class FederationConfig:
    """Who holds what (explicit node lists or a generated partition) and how rounds run."""

    nodes: list[NodeConfig] | None = None
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    algorithm: Algorithm = Algorithm.federated
    rounds: int = 10
    clients_per_round: int | None = None
    client_fraction: float = 1.0
    local_epochs: int = 2
    aggregation: Aggregation = Aggregation.fedavg
    fedprox_mu: float = 0.01
    server_lr: float | None = None
    server_momentum: float = 0.9
    server_betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    server_tau: float = 0.001
    feddyn_alpha: float = 0.01
    fedrep_head_epochs: int = 2
    ditto_lambda: float = 0.1
    fedgen: FedGenConfig = field(default_factory=FedGenConfig)
    eval_every: int = 1


@dataclass
class AdapterConfig:
    """Audio tokens to the text encoder's space: per-token MLP, then attention pooling."""

    hidden_dim: int = 256
    n_latents: int = 1
    num_heads: int = 4
    dropout: float = 0.1
    loss: str = "mse+cosine"
    mse_weight: float = 1.0
    cosine_weight: float = 1.0
    temperature: float = 0.07
    lr: float = 0.001
    weight_decay: float = 0.0001
    batch_size: int = 32
    grad_clip: float = 1.0
    lr_schedule: LrSchedule = LrSchedule.none
    precision: Precision = Precision.fp32
    sequence_weight: float = 1.0


@dataclass
class EvalConfig:
    """Zero-shot evaluation of adapters, and how often and how generators are scored."""

    label_space: LabelSpace = LabelSpace.federation
    generator_every: int = 1
    prdc_k: int = 5
    mmd_permutations: int = 0
    max_rows: int = 1000
    privacy_every: int = 0


@dataclass
class CheckpointConfig:
    """Resumable state, saved every ``every`` rounds (0: never) into ``<run>/checkpoints``: the
    ``keep_last`` newest, and after a completed run none unless ``keep_on_complete``."""

    every: int = 5
    keep_last: int = 1
    keep_on_complete: bool = True
    optimizer_state: bool = True


@dataclass
class GeneratorConfig:
    """VAE generators of each node's audio embeddings and the synthetic samples they share."""

    enabled: bool = True
    model: GeneratorModel = GeneratorModel.vae
    gaussian_covariance: GaussianCovariance = GaussianCovariance.diagonal
    gaussian_rank: int = 0
    granularity: Granularity = Granularity.per_class
    class_groups: dict[str, list[str]] = field(default_factory=dict)
    training_epochs: int = 30
    beta_warmup_ratio: float = 0.5
    beta_schedule: BetaSchedule = BetaSchedule.linear
    beta_max: float = 64.0
    n_cycles: int = 4
    cycle_ratio: float = 0.5
    schedule_scope: ScheduleScope = ScheduleScope.per_round
    kl_reduction: KlReduction = KlReduction.sum
    similarity_weight: float = 0.1
    likelihood: Likelihood = Likelihood.gaussian
    decoder_variance: DecoderVariance = DecoderVariance.optimal
    variance_lr: float = 0.01
    variance_floor: float = 1e-4
    free_bits: float = 0.0
    sequence_length: int = 4
    latent_dim: int = 32
    hidden_dim: int = 128
    conditional: bool = True
    sample_noise: bool = True
    lr: float = 0.001
    batch_size: int = 8
    grad_clip: float = 1.0
    train_every: int = 1
    training_data: TrainingData = TrainingData.audio
    augmentation_noise: float = 0.0
    synthetic_samples_per_class: str = "auto"
    share: ShareMode = ShareMode.samples
    on_nan: OnNan = OnNan.error
    precision: Precision = Precision.fp32
    load_from: str | None = None


@dataclass
class ServerGeneratorConfig:
    """Generators the server trains on the synthetic samples it receives (``none``: keep them)."""

    granularity: ServerGranularity = ServerGranularity.none


@dataclass
class ServerConfig:
    """How the server trains the global adapter."""

    adapter_training: AdapterTraining = ADAPTER_TRAINING_DEFAULT  # type: ignore[assignment]
    synthetic_epochs: int = 5
    synthetic_balance: bool = True
    synthetic_mu: float = 0.1
    skip_failed_classes: bool = True
    synthetic_guard: bool = True
    generator: ServerGeneratorConfig = field(default_factory=ServerGeneratorConfig)


@dataclass
class CsvLoggerConfig:
    filename: str = "metrics.csv"


@dataclass
class WandbLoggerConfig:
    project: str = "feda2v"
    entity: str | None = None
    mode: WandbMode = WandbMode.offline
    tags: list[str] = field(default_factory=list)
    notes: str | None = None


@dataclass
class LoggerConfig:
    """Active trackers: a tracker is on when its section is present (``logger=[csv,wandb]``)."""

    csv: CsvLoggerConfig | None = None
    wandb: WandbLoggerConfig | None = None


@dataclass
class ExecutorConfig:
    """How a round's client work runs (docs/scaling.md): ``sequential`` (one client after
    another), ``batched`` (the selected clients as one stacked model, ``clients_per_batch`` at a
    time) or ``ray`` (batches of clients as Ray tasks, locally or on a cluster)."""

    name: ExecutorName = ExecutorName.batched
    clients_per_batch: int = 64
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    address: str | None = None
    connect_timeout_s: float = 30.0
    max_retries: int = 1


@dataclass
class ImagesConfig:
    """Rendering adapter outputs with a diffusion pipeline, judged zero-shot by a CLIP model
    (docs/images.md)."""

    pipeline: PipelineName = PipelineName.none
    path: str | None = None
    every: int = 0
    splits: list[str] = field(default_factory=lambda: ["test"])
    per_class: int = 1
    nodes: bool = False
    source: ImageSource = ImageSource.adapter
    steps: int = 25
    guidance: float = 7.5
    height: int = 512
    width: int = 512
    seed: int = 0
    dtype: ImageDtype = ImageDtype.fp16
    batch_size: int = 8
    log_limit: int = 50
    judge_path: str | None = None
    judge_prompt: str = "a photo of {name}"


@dataclass
class PrivacyConfig:
    """Sample-level DP-SGD of each node's adapter and generators (``privacy=dp``;
    docs/privacy.md): Poisson-sampled minibatches, per-sample clipping to ``max_grad_norm``
    (``generator_max_grad_norm`` for the generators), Gaussian noise of
    ``noise_multiplier`` (or the one that spends ``target_epsilon`` over the planned steps),
    accounted at ``delta`` (null: a tenth of 1 / the node's training clips)."""

    enabled: bool = False
    max_grad_norm: float = 1.0
    generator_max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float | None = None
    accountant: str = "rdp"
    client_level: bool = False
    client_clip: float = 1.0
    client_noise_multiplier: float = 1.0


@dataclass
class Config:
    """The whole run."""

    name: str = "default"
    seed: int = 0
    resume: bool = False
    device: str = "auto"
    deterministic: bool = False
    threads: int | None = None
    cache_dir: str = "${oc.env:FEDA2V_CACHE_DIR,'~/.cache/feda2v'}"
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    audio_encoder: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    embeddings: EmbeddingsConfig = field(default_factory=EmbeddingsConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
