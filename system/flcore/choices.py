"""The closed sets of values that config keys take (``generator.model``, ``federation.algorithm``,
...): one enum per key, shared by the schemas in :mod:`flcore.config` and the code that branches
on them."""

from enum import Enum


class DatasetName(str, Enum):
    synthetic = "synthetic"
    esc50 = "esc50"
    folder = "folder"


class SplitKind(str, Enum):
    folds = "folds"
    ratio = "ratio"


class OnBadFile(str, Enum):
    error = "error"
    skip = "skip"


class PartitionKind(str, Enum):
    classes_per_node = "classes_per_node"
    dirichlet = "dirichlet"
    iid = "iid"


class GeneratorModel(str, Enum):
    """``generator.model``: VAE generators, the closed-form Gaussian floor, or the
    class-agnostic noise control arm."""

    vae = "vae"
    gaussian = "gaussian"
    noise = "noise"


class GaussianCovariance(str, Enum):
    diagonal = "diagonal"
    low_rank = "low_rank"


class Granularity(str, Enum):
    unified = "unified"
    per_class = "per_class"
    per_group = "per_group"


class BetaSchedule(str, Enum):
    linear = "linear"
    cyclical = "cyclical"
    sigmoid = "sigmoid"
    constant = "constant"


class AudioEncoderName(str, Enum):
    yamnet = "yamnet"
    mfcc = "mfcc"
    ast = "ast"


class TextEncoderName(str, Enum):
    minilm = "minilm"
    clip = "clip"
    clip_t5 = "clip_t5"


class TextOutput(str, Enum):
    pooled = "pooled"
    sequence = "sequence"


class Algorithm(str, Enum):
    federated = "federated"
    local = "local"
    centralized = "centralized"


class Aggregation(str, Enum):
    fedavg = "fedavg"
    mean = "mean"
    fedprox = "fedprox"
    fedadam = "fedadam"
    fedavgm = "fedavgm"
    fedyogi = "fedyogi"
    fedadagrad = "fedadagrad"
    scaffold = "scaffold"
    feddyn = "feddyn"
    fedper = "fedper"
    fedrep = "fedrep"
    ditto = "ditto"
    fedgen = "fedgen"


class LrSchedule(str, Enum):
    none = "none"
    cosine = "cosine"


class LabelSpace(str, Enum):
    federation = "federation"
    dataset = "dataset"


class KlReduction(str, Enum):
    sum = "sum"
    mean = "mean"


class Likelihood(str, Enum):
    mse = "mse"
    gaussian = "gaussian"


class DecoderVariance(str, Enum):
    optimal = "optimal"
    learned = "learned"


class ScheduleScope(str, Enum):
    per_round = "per_round"
    whole_run = "whole_run"


class OnNan(str, Enum):
    error = "error"
    drop_generator = "drop_generator"


class TrainingData(str, Enum):
    audio = "audio"
    adapter_output = "adapter_output"


class ShareMode(str, Enum):
    samples = "samples"
    decoder = "decoder"


#: ``server.adapter_training``. OmegaConf reads an enum value by its member's *name*, so each
#: member is named by its value (``fedavg+synthetic`` is no identifier, hence this functional
#: form): the key composes, prints and is refused exactly as written, and a value outside the set
#: is refused while composing, naming the four. Code names that member
#: ``AdapterTraining.fedavg_synthetic``, an alias outside ``__members__`` (never a valid value).
AdapterTraining = Enum(
    "AdapterTraining",
    [("fedavg", "fedavg"), ("synthetic", "synthetic"), ("fedavg+synthetic", "fedavg+synthetic"),
     ("kd", "kd")],
    type=str, module=__name__, qualname="AdapterTraining")
AdapterTraining.fedavg_synthetic = AdapterTraining["fedavg+synthetic"]


class ServerGranularity(str, Enum):
    none = "none"
    unified = "unified"
    per_class = "per_class"
    per_group = "per_group"


class Precision(str, Enum):
    """Arithmetic of a training step's forward pass (parameters and optimizer stay fp32)."""

    fp32 = "fp32"
    bf16 = "bf16"


class ExecutorName(str, Enum):
    sequential = "sequential"
    batched = "batched"
    ray = "ray"


class PipelineName(str, Enum):
    none = "none"
    sd = "sd"
    flux = "flux"


class ImageSource(str, Enum):
    adapter = "adapter"
    prompt = "prompt"
    synthetic = "synthetic"


class ImageDtype(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class WandbMode(str, Enum):
    online = "online"
    offline = "offline"
    disabled = "disabled"
