"""A zero-shot CLIP judge: how close each image is to each class prompt, by cosine similarity."""

import json
from typing import Any

import torch
import torch.nn.functional as F

from flcore.errors import ConfigError
from flcore.visual.pipelines import download_hint, resolve_weights

BATCH = 64
"""Images per forward pass of the vision tower."""


def _projected(output: Any) -> torch.Tensor:
    """The projected embeddings of ``get_*_features``: a tensor in transformers 4, the
    ``pooler_output`` of a model output in transformers 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipJudge:
    """A CLIP model and its processor from a local folder or the local Hugging Face cache."""

    def __init__(self, path: str, device: torch.device) -> None:
        from safetensors import SafetensorError
        from transformers import CLIPModel, CLIPProcessor

        folder = resolve_weights(path, "images.judge_path", required="config.json")
        try:
            model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        except (ValueError, AttributeError):
            model_type = None
        if model_type != "clip":
            raise ConfigError(f"images.judge_path={path}: {folder} holds a {model_type} model, "
                              "not a CLIP model (config.json model_type 'clip'); point it at "
                              "one, e.g. `hf download openai/clip-vit-base-patch32 --local-dir "
                              "DIR` on a machine with internet")
        try:
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError, SafetensorError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"images.judge_path={path}: the CLIP model or its processor in "
                              f"{folder} does not load ({reason}); "
                              f"{download_hint(path, str(folder))}") from err
        self.device = device

    @torch.no_grad()
    def scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Cosine similarities ``[N, K]`` of images ``[N, 3, H, W]`` in [0, 1] to ``prompts``."""
        text = self.processor(text=prompts, return_tensors="pt", padding=True, truncation=True)
        prompts_embedded = F.normalize(_projected(self.model.get_text_features(
            input_ids=text.input_ids.to(self.device),
            attention_mask=text.attention_mask.to(self.device))), dim=-1)
        rows = []
        for batch in images.detach().float().cpu().split(BATCH):
            pixels = self.processor(images=batch, return_tensors="pt", do_rescale=False)
            embedded = _projected(self.model.get_image_features(
                pixel_values=pixels.pixel_values.to(self.device)))
            rows.append(F.normalize(embedded, dim=-1) @ prompts_embedded.T)
        return torch.cat(rows).float().cpu()
