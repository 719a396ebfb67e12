"""Text-to-image pipelines (diffusers) driven by conditioning embeddings instead of prompts.

Weights come from a local folder or the local Hugging Face cache, never the net. Each image is
drawn from its own seeded generator, so it depends only on its seed and conditioning, not on the
batch it was rendered in; batches shrink on running out of GPU memory.
"""

import io
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from flcore.encoders.local import REPO_ID
from flcore.errors import ConfigError, ResourceError, TrainingError
from flcore.files import atomic_write_bytes

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

log = logging.getLogger(__name__)

PIPELINE_CLASSES = {"sd": "StableDiffusionPipeline", "flux": "FluxPipeline"}
"""The diffusers class of each ``images.pipeline`` kind, as ``model_index.json`` names it."""


def download_hint(path: str, folder: str) -> str:
    """How to get a model's weights onto this machine."""
    model = path if REPO_ID.fullmatch(path) else "MODEL_ID"
    return f"on a machine with internet run `hf download {model} --local-dir {folder}`"


def resolve_weights(path: str, key: str, required: str = "model_index.json") -> Path:
    """The local folder of ``path`` (a folder, or a model id in the local Hugging Face cache)
    holding ``required``; a one-line error naming config key ``key`` if it is not there."""
    folder = Path(path).expanduser()
    if not folder.exists() and REPO_ID.fullmatch(path):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            folder = Path(snapshot_download(path, local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError) as err:
            raise ConfigError(
                f"{key}={path}: no such folder, and no such model in the local Hugging Face cache "
                f"(nothing is downloaded at run time); {download_hint(path, 'DIR')} and set "
                f"{key}=DIR") from err
    if not folder.is_dir():
        raise ConfigError(f"{key}={path}: no such folder; {download_hint(path, str(folder))}")
    if not (folder / required).is_file():
        raise ConfigError(f"{key}={path}: no {required} in {folder}; it must be a model folder "
                          f"saved with save_pretrained ({download_hint(path, str(folder))})")
    return folder


def check_kind(folder: Path, kind: str, path: str) -> None:
    """Raise ConfigError unless ``folder``'s ``model_index.json`` is a ``kind`` pipeline."""
    if kind not in PIPELINE_CLASSES:
        raise ConfigError(f"images.pipeline={kind}: unknown; use one of "
                          f"{', '.join(PIPELINE_CLASSES)}")
    try:
        found = json.loads((folder / "model_index.json").read_text()).get("_class_name")
    except (ValueError, AttributeError) as err:
        raise ConfigError(f"images.path={path}: {folder / 'model_index.json'} is not a JSON "
                          f"object; {download_hint(path, str(folder))}") from err
    if found == PIPELINE_CLASSES[kind]:
        return
    other = {c: k for k, c in PIPELINE_CLASSES.items()}.get(found)
    fix = f"set images.pipeline={other}" if other else "point images.path at a supported one"
    raise ConfigError(f"images.path={path}: it holds a {found}, not the {PIPELINE_CLASSES[kind]} "
                      f"that images.pipeline={kind} needs; {fix}")


def load_pipeline(kind: str, path: str, device: torch.device,
                  dtype: torch.dtype) -> "DiffusionPipeline":
    """The ``kind`` ("sd" or "flux") pipeline at ``path`` on ``device`` in ``dtype``, offline,
    with no safety checker and no progress bar."""
    folder = resolve_weights(path, "images.path")
    check_kind(folder, kind, path)
    from diffusers import FluxPipeline, StableDiffusionPipeline
    from safetensors import SafetensorError

    # SD keeps its text encoder for the empty prompt of guidance; Flux is given embeddings only,
    # so its T5 and CLIP (about 9.5 GB in bf16) stay on disk.
    extra: dict[str, Any] = (
        {"safety_checker": None, "requires_safety_checker": False} if kind == "sd" else
        {"text_encoder": None, "tokenizer": None, "text_encoder_2": None, "tokenizer_2": None})
    cls = StableDiffusionPipeline if kind == "sd" else FluxPipeline
    try:
        pipe = cls.from_pretrained(folder, dtype=dtype, local_files_only=True, **extra)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"images.path={path}: the {PIPELINE_CLASSES[kind]} in {folder} does "
                          f"not load ({reason}); its weight files are missing or corrupt, "
                          f"{download_hint(path, str(folder))}") from err
    pipe.set_progress_bar_config(disable=True)
    try:
        return pipe.to(device)
    except torch.OutOfMemoryError:
        raise ResourceError(f"images.path={path}: the {PIPELINE_CLASSES[kind]} does not fit in "
                            f"the memory of {device} beside the run; use images.dtype=bf16 or "
                            "fp16, or render later with scripts/render.py") from None


def conditioning_shape(pipe: "DiffusionPipeline", kind: str) -> dict[str, Any]:
    """What the pipeline is conditioned on: sd a token sequence ``(tokens, width)``; flux a
    sequence of any length of width ``sequence_width`` and a pooled vector of width ``pooled``."""
    if kind == "sd":
        return {"sequence": (pipe.tokenizer.model_max_length, pipe.unet.config.cross_attention_dim)}
    config = pipe.transformer.config
    return {"sequence_width": config.joint_attention_dim, "pooled": config.pooled_projection_dim}


def check_conditioning(pipe: "DiffusionPipeline", kind: str, sequence_shape: tuple[int, ...],
                       pooled_width: int | None) -> None:
    """Raise ConfigError unless conditioning of one image's ``sequence_shape`` ``(tokens, width)``
    (and, for flux, a pooled vector of ``pooled_width``) fits the pipeline."""
    shape = conditioning_shape(pipe, kind)
    fix = ("train the adapter against the pipeline's own text encoder (text_encoder.path = the "
           "images.path folder)")
    if kind == "sd":
        if tuple(sequence_shape) != shape["sequence"]:
            tokens, width = shape["sequence"]
            raise ConfigError(
                f"images.pipeline=sd: the pipeline expects conditioning of {tokens} tokens x "
                f"{width} but the adapter gives {' x '.join(map(str, sequence_shape))}; {fix}")
        return
    gives = (sequence_shape[-1], pooled_width)
    if gives != (shape["sequence_width"], shape["pooled"]):
        raise ConfigError(
            f"images.pipeline=flux: the pipeline expects token sequences of width "
            f"{shape['sequence_width']} and a pooled vector of width {shape['pooled']} but the "
            f"adapter gives widths {gives[0]} and {gives[1]}; {fix}")


def _first_nonfinite(rows: torch.Tensor) -> int | None:
    """The index of the first row of ``rows`` with a NaN or infinite value, or None."""
    bad = (~torch.isfinite(rows.flatten(1))).any(1).nonzero()
    return int(bad[0]) if len(bad) else None


def _empty_prompt(pipe: "DiffusionPipeline") -> torch.Tensor:
    """The SD pipeline's own embedding of the empty prompt ``[1, tokens, width]``, the negative
    of classifier-free guidance (computed once, not once per batch)."""
    return pipe.encode_prompt("", pipe.device, 1, False)[0]


def _render_batch(pipe: "DiffusionPipeline", kind: str, sequence: torch.Tensor,
                  pooled: torch.Tensor | None, seeds: list[int], negative: torch.Tensor | None,
                  options: dict[str, Any]) -> torch.Tensor | None:
    """One batch of images ``[B, 3, H, W]`` (float32, CPU), or None if it ran out of memory."""
    device, dtype = pipe.device, pipe.dtype
    inputs = {"prompt_embeds": sequence.to(device, dtype),
              "generator": [torch.Generator(device).manual_seed(s) for s in seeds], **options}
    if kind == "flux":
        inputs["pooled_prompt_embeds"] = pooled.to(device, dtype)
    if negative is not None:
        inputs["negative_prompt_embeds"] = negative.expand(len(seeds), -1, -1)
    try:
        return pipe(**inputs).images.float().cpu()
    except torch.OutOfMemoryError:
        return None


def _halve(batch_size: int, height: int, width: int) -> int:
    """Half of ``batch_size`` after running out of memory; ResourceError if it is already 1."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if batch_size == 1:
        raise ResourceError(f"images.batch_size: rendering one {height}x{width} image runs out of "
                            "GPU memory; lower images.height/images.width or use "
                            "images.dtype=fp16")
    log.warning("rendering %d images of %dx%d at once ran out of GPU memory; trying %d",
                batch_size, height, width, batch_size // 2)
    return batch_size // 2


def render(pipe: "DiffusionPipeline", kind: str, sequence: torch.Tensor,
           pooled: torch.Tensor | None, seeds: list[int], names: list[str], *, steps: int,
           guidance: float, height: int, width: int, batch_size: int,
           shrunk: Callable[[int], None] | None = None) -> torch.Tensor:
    """One image per row of ``sequence`` ``[N, T, D]`` (flux: and of ``pooled`` ``[N, Dp]``),
    each from its own seed: float32 CPU images ``[N, 3, H, W]`` in [0, 1]. ``names`` name the
    images in errors; ``shrunk`` hears each smaller batch size out of memory forced, so that the
    caller can start there next time."""
    if not len(sequence) == len(seeds) == len(names):
        raise ValueError(f"{len(sequence)} conditionings, {len(seeds)} seeds, {len(names)} names")
    check_conditioning(pipe, kind, tuple(sequence.shape[1:]),
                       None if pooled is None else pooled.shape[-1])
    for rows in (sequence, pooled):
        bad = None if rows is None else _first_nonfinite(rows)
        if bad is not None:
            raise TrainingError(f"image {names[bad]}: its conditioning has NaN or infinite "
                                "values, so the adapter diverged; lower adapter.lr or set "
                                "adapter.grad_clip")
    negative = _empty_prompt(pipe) if kind == "sd" and guidance > 1 else None
    options = {"num_inference_steps": steps, "guidance_scale": guidance, "height": height,
               "width": width, "output_type": "pt"}
    images: list[torch.Tensor] = []
    start = 0
    while start < len(seeds):
        stop = min(start + batch_size, len(seeds))
        batch = _render_batch(pipe, kind, sequence[start:stop],
                              None if pooled is None else pooled[start:stop], seeds[start:stop],
                              negative, options)
        if batch is None:
            batch_size = _halve(batch_size, height, width)
            if shrunk is not None:
                shrunk(batch_size)
            continue
        bad = _first_nonfinite(batch)
        if bad is not None:
            raise TrainingError(f"image {names[start + bad]}: the pipeline returned NaN pixels; "
                                "render in fp32 or bf16 (images.dtype; fp16 overflows in some "
                                "pipelines), or check the weights at images.path")
        images.append(batch)
        start = stop
    return torch.cat(images)


def save_png(image: torch.Tensor, path: Path) -> None:
    """Write ``image`` ``[3, H, W]`` in [0, 1] as an 8-bit PNG, atomically (parents created)."""
    from PIL import Image

    pixels = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    atomic_write_bytes(Path(path), buffer.getvalue())
