"""Rendering a round's adapter outputs (or the oracle prompts, or synthetic samples) with the
configured pipeline, saving every image, logging some, and judging them zero-shot.

An image's name carries its round, split, renderer (``global`` or ``node{i}``), class and index:
``images/round_003/test/node2/dog_01.png`` under the run folder."""

import importlib.util
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from flcore.clients.protocol import SharedTensors
from flcore.config import Config, ImageDtype, ImageSource, PipelineName
from flcore.encoders.text import class_prompts
from flcore.errors import ConfigError
from flcore.files import write_csv
from flcore.metrics.classification import classification_metrics
from flcore.tracking import Trackers
from flcore.trainmodel.adapters import AudioAdapter
from flcore.visual.judge import ClipJudge
from flcore.visual.pipelines import (
    check_conditioning,
    check_kind,
    load_pipeline,
    render,
    resolve_weights,
    save_png,
)

log = logging.getLogger(__name__)

DTYPES = {ImageDtype.fp32: torch.float32, ImageDtype.fp16: torch.float16,
          ImageDtype.bf16: torch.bfloat16}


@dataclass
class RenderSet:
    """Images one adapter renders: ``who`` (``global`` or ``node{i}``) on ``split``, one per row
    of ``tokens`` (audio tokens; unused when rendering prompts) with dataset class ids
    ``labels`` and owner nodes ``nodes``."""

    who: str
    split: str
    state: dict[str, torch.Tensor] | None
    tokens: torch.Tensor
    labels: torch.Tensor
    nodes: torch.Tensor


def pick_per_class(rows: torch.Tensor, labels: torch.Tensor, per_class: int) -> torch.Tensor:
    """The first ``per_class`` of ``rows`` of each class, in class then row order."""
    picked = [rows[labels[rows] == c][:per_class] for c in labels[rows].unique().tolist()]
    return torch.cat(picked) if picked else rows[:0]


class Renderer:
    """The pipeline and judge of ``images.*``, loaded once (so missing or mismatched weights
    stop the run before its first round), and what one rendering round does."""

    def __init__(self, config: Config, shared: SharedTensors, run_dir: Path,
                 trackers: Trackers) -> None:
        self.images, self.shared, self.trackers = config.images, shared, trackers
        self.rounds = config.federation.rounds
        self.folder = Path(run_dir) / "images"
        device = shared.tokens.device
        i = self.images
        if shared.sequence is None:
            raise ConfigError(f"images.pipeline={i.pipeline.value}: the adapter has no sequence "
                              "head; set text_encoder.output=sequence")
        self.kind = i.pipeline.value
        self.batch_size = i.batch_size
        self.pipe = load_pipeline(self.kind, str(i.path), device, DTYPES[i.dtype])
        pooled = shared.pooled_raw
        check_conditioning(self.pipe, self.kind, tuple(shared.sequence.shape[1:]),
                           None if pooled is None else pooled.shape[1])
        self.judge = ClipJudge(i.judge_path, device) if i.judge_path else None
        if self.judge is None:
            log.info("images.judge_path is null: images are rendered and saved, not judged")
        space = shared.label_space
        self.judge_prompts = class_prompts([shared.class_names[c] for c in space.tolist()],
                                           i.judge_prompt)
        # Flux reads CLIP's unnormalised pooled output: adapters (trained on the normalised
        # one) are rescaled to the class prompts' mean norm.
        self.pooled_norm = (None if pooled is None
                            else float(pooled[space].norm(dim=-1).mean()))

    def shrink(self, batch_size: int) -> None:
        """Keep the batch size that out of memory forced for every later set and round."""
        self.batch_size = batch_size

    def is_render_round(self, round_: int) -> bool:
        every = self.images.every
        return round_ == self.rounds or (every > 0 and round_ % every == 0)

    @torch.no_grad()
    def conditioning(self, model: AudioAdapter, s: RenderSet
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pipeline's inputs for ``s``: the class prompts' own conditioning
        (``source=prompt``), or the adapter's sequence (and pooled) outputs."""
        shared = self.shared
        assert shared.sequence is not None
        if self.images.source is ImageSource.prompt:
            pooled = None if shared.pooled_raw is None else shared.pooled_raw[s.labels]
            return shared.sequence[s.labels], pooled
        assert s.state is not None
        model.load_state_dict(s.state)
        model.eval()
        pooled, sequence = model.outputs(s.tokens)
        assert sequence is not None
        if self.pooled_norm is None:
            return sequence, None
        return sequence, F.normalize(pooled, dim=-1) * self.pooled_norm

    def names(self, round_: int, s: RenderSet) -> list[str]:
        """``round_003/test/global/dog_01`` per image: index within the class."""
        seen: dict[int, int] = {}
        out = []
        for c in s.labels.tolist():
            seen[c] = seen.get(c, 0) + 1
            out.append(f"round_{round_:03d}/{s.split}/{s.who}/{self.shared.class_names[c]}_"
                       f"{seen[c]:02d}")
        return out

    def run(self, round_: int, model: AudioAdapter, sets: list[RenderSet]) -> dict[str, float]:
        """Render, save and judge every set; ``images/*`` of the global sets (``images/val/*``
        for val; of all node sets when there is no global adapter) and ``node{i}/images/*``
        (acc, balanced_acc, macro_f1) per node, from its own set where it has one."""
        i, metrics, logged = self.images, {}, 0
        rows: list[dict[str, str | float]] = []
        own = {s.who for s in sets if s.who != "global"}
        judged: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        has_global = any(s.who == "global" for s in sets)
        for s in sets:
            if not len(s.labels):
                continue
            names = self.names(round_, s)
            sequence, pooled = self.conditioning(model, s)
            seeds = [image_seed(i.seed, n) for n in names]
            pictures = render(self.pipe, self.kind, sequence, pooled, seeds, names,
                              steps=i.steps, guidance=i.guidance, height=i.height,
                              width=i.width, batch_size=self.batch_size, shrunk=self.shrink)
            for name, picture in zip(names, pictures, strict=True):
                path = self.folder / f"{name}.png"
                save_png(picture, path)
                if logged < i.log_limit:
                    self.trackers.log_image(f"images/{name.split('/', 1)[1]}", path, round_)
                    logged += 1
            if self.judge is None:
                continue
            scores = self.judge.scores(pictures, self.judge_prompts)
            position = torch.searchsorted(self.shared.label_space.cpu(), s.labels.cpu())
            prefix = "images/" if s.split in ("test", "synthetic") else f"images/{s.split}/"
            if s.who == "global" or not has_global:
                judged.setdefault(prefix, []).append((position, scores))
            nodes = s.nodes.cpu()
            for node in nodes.unique().tolist():
                if s.who == "global" and f"node{node}" in own:
                    continue
                mask = nodes == node
                metrics.update({f"node{node}/{prefix}{k}": v for k, v in classification_metrics(
                    position[mask], scores[mask]).items() if k != "top5"})
            predicted = scores.argmax(1).tolist()
            rows += [{"image": n, "class": self.shared.class_names[c],
                      "judged": self.judge_prompts[p], "correct": float(p == t)}
                     for n, c, p, t in zip(names, s.labels.tolist(), predicted,
                                           position.tolist(), strict=True)]
        for prefix, parts in judged.items():  # without a global adapter: over the nodes' own
            position, scores = (torch.cat(t) for t in zip(*parts, strict=True))
            metrics.update({prefix + k: v for k, v in
                            classification_metrics(position, scores).items()})
        if rows:
            self.write_judgements(round_, rows)
        return metrics

    def write_judgements(self, round_: int, rows: list[dict[str, str | float]]) -> None:
        """``images/round_NNN/judgements.csv``: each image, its class and the judge's pick."""
        write_csv(self.folder / f"round_{round_:03d}" / "judgements.csv", list(rows[0]), rows)


def image_seed(seed: int, name: str) -> int:
    """The noise seed of image ``name`` (``round_003/test/global/dog_01``): from its split, class
    and index only, so the same clip's images share their noise across rounds and between the
    global and the nodes' adapters, and differ only by their conditioning."""
    _, split, _, picture = name.split("/")
    return seed * 1_000_003 + hash_name(f"{split}/{picture}")


def hash_name(name: str) -> int:
    """A stable 31-bit number of an image name (Python's ``hash`` of a str is salted per
    process), so an image's seed depends on its name only."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def needs_renderer(config: Config) -> bool:
    """Whether the run renders images (``images.pipeline`` is not ``none``)."""
    return config.images.pipeline is not PipelineName.none


def check_images(config: Config, device: torch.device) -> None:
    """Before any data is read: a dtype the device can render in, a pipeline of the configured
    kind in ``images.path`` and a model in ``images.judge_path`` (file-system checks; loading
    them is the renderer's first step)."""
    if needs_renderer(config):
        if importlib.util.find_spec("diffusers") is None:
            raise ConfigError(f"images.pipeline={config.images.pipeline.value}: diffusers is not "
                              "installed; pip install -e \".[images]\"")
        if device.type == "cpu" and config.images.dtype is ImageDtype.fp16:
            raise ConfigError("images.dtype=fp16: half precision diffusion runs on a GPU only; "
                              "set images.dtype=fp32 (or bf16) to render on the CPU")
        folder = resolve_weights(str(config.images.path), "images.path")
        check_kind(folder, config.images.pipeline.value, str(config.images.path))
        if config.images.judge_path:
            resolve_weights(config.images.judge_path, "images.judge_path", "config.json")
