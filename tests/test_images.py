"""Rendering in a federation, end to end on CPU with tiny random-weight pipelines and judges
(real diffusers and transformers code): conditioning targets equal to the pipeline's own, a run
that trains, renders, judges and reports, the judge's metrics against an independent CLIP
computation, offline rendering from a checkpoint, and the bad-input paths."""

import csv
import json
import logging
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ADAPTERS_ONLY, HANG_GUARD_S

pytest.importorskip("diffusers")

from PIL import Image
from sklearn.metrics import balanced_accuracy_score, f1_score

from flcore.config import TextEncoderConfig, TextEncoderName, TextOutput
from flcore.encoders.text import ClipT5TextEncoder, ClipTextEncoder, class_prompts
from flcore.errors import ConfigError, TrainingError
from flcore.offline import render_run
from tiny_models import save_tiny_clip_judge, save_tiny_flux, save_tiny_sd

REPO = Path(__file__).parents[1]
PROMPTS = ["the sound of rising chirp", "the sound of bell ring", "the sound of siren wail"]
FAST = (*ADAPTERS_ONLY, "images.height=32", "images.width=32", "images.steps=2",
        "images.dtype=fp32", "images.batch_size=4")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny SD 1.x pipeline, a tiny Flux pipeline and a tiny CLIP judge, saved once."""
    root = tmp_path_factory.mktemp("models")
    return {"sd": save_tiny_sd(root / "sd"), "flux": save_tiny_flux(root / "flux"),
            "judge": save_tiny_clip_judge(root / "judge")}


@pytest.fixture
def sd_run(run_config: Callable[..., dict], models: dict[str, Path]) -> Callable[..., dict]:
    """A run whose adapter targets the tiny SD's own CLIP conditioning and renders with it."""
    return partial(run_config, *FAST, "+experiment=synthetic_sd", f"images.path={models['sd']}",
                   f"images.judge_path={models['judge']}")


def test_clip_sequences_are_the_conditioning_sd_computes(models: dict[str, Path]) -> None:
    """text_encoder=clip on an SD folder gives, as targets, exactly what the pipeline encodes a
    prompt into; pooled is its normalised end-of-text state (no projection there)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(models["sd"], safety_checker=None)
    encoder = ClipTextEncoder(TextEncoderConfig(name=TextEncoderName.clip, path=str(models["sd"]),
                                                output=TextOutput.sequence, max_length=77))
    targets = encoder.encode(PROMPTS)
    with torch.no_grad():
        want, _ = pipe.encode_prompt(PROMPTS, torch.device("cpu"), 1, False)
        ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77,
                             return_tensors="pt").input_ids
        eos = pipe.text_encoder(ids).pooler_output
    assert targets.sequence is not None and targets.sequence.shape == (3, 77, 32)
    torch.testing.assert_close(targets.sequence, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(targets.pooled, F.normalize(eos, dim=-1), rtol=1e-5, atol=1e-6)


def test_clip_t5_targets_are_the_conditioning_flux_computes(models: dict[str, Path]) -> None:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(models["flux"])
    encoder = ClipT5TextEncoder(TextEncoderConfig(name=TextEncoderName.clip_t5,
                                                  path=str(models["flux"]),
                                                  output=TextOutput.sequence, max_length=24))
    targets = encoder.encode(PROMPTS)
    with torch.no_grad():
        sequence, pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, max_sequence_length=24)
    assert targets.sequence is not None and targets.pooled_raw is not None
    torch.testing.assert_close(targets.sequence, sequence, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(targets.pooled_raw, pooled, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(targets.pooled, F.normalize(pooled, dim=-1))


def judge_predictions(judge: Path, pngs: list[Path], prompts: list[str]) -> list[int]:
    """The tiny CLIP's zero-shot picks for saved images, computed here with transformers'
    own CLIPModel forward (logits per image), independently of flcore's judge."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(judge).eval(), CLIPProcessor.from_pretrained(judge)
    images = [Image.open(p).convert("RGB") for p in pngs]
    with torch.no_grad():
        batch = processor(text=prompts, images=images, return_tensors="pt", padding=True)
        return model(**batch).logits_per_image.argmax(1).tolist()


def test_a_federation_renders_judges_and_reports(sd_run: Callable[..., dict], tmp_path: Path,
                                                 models: dict[str, Path]) -> None:
    results = sd_run("federation.rounds=2", "images.every=1", "images.nodes=true",
                     "images.splits=[test,val]")
    final, run = results["final"], tmp_path / "run"
    classes = results["partition"]["nodes"]
    names = sorted({c for node in classes for c in node["classes"]})
    for round_ in (1, 2):
        for split in ("test", "val"):
            folder = run / "images" / f"round_{round_:03d}" / split
            assert sorted(p.stem for p in (folder / "global").glob("*.png")) == [
                f"{c}_01" for c in names]
            for node in classes:  # each node's own adapter on its own classes
                assert sorted(p.stem for p in (folder / f"node{node['node']}").glob("*.png")) \
                    == sorted(f"{c}_01" for c in node["classes"])
    for key in ("images/acc", "images/balanced_acc", "images/macro_f1", "images/val/acc",
                "global/sequence_acc", "global/sequence_mse",
                *(f"node{n['node']}/images/{k}" for n in classes
                  for k in ("acc", "balanced_acc", "macro_f1"))):
        assert key in final, key
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["images/acc"] != "" for r in rows if r["round"] in ("1", "2")] == [True, True]
    # The judge's metrics against transformers' CLIP on the saved images of the last round.
    pngs = [run / "images" / "round_002" / "test" / "global" / f"{c}_01.png" for c in names]
    space = list(results["per_class"])  # the label space, in its order
    prompts = class_prompts(space, "a photo of {name}")
    picked = judge_predictions(models["judge"], pngs, prompts)
    truth = [space.index(c) for c in names]
    assert final["images/acc"] == pytest.approx(
        sum(p == t for p, t in zip(picked, truth, strict=True)) / len(truth))
    assert final["images/balanced_acc"] == pytest.approx(balanced_accuracy_score(truth, picked))
    assert final["images/macro_f1"] == pytest.approx(f1_score(truth, picked, average="macro"))
    with (run / "images" / "round_002" / "judgements.csv").open() as f:
        judged = list(csv.DictReader(f))
    assert len(judged) == 2 * 2 * len(names)  # test and val; global and the nodes' own


def test_the_judge_scores_a_label_space_of_some_classes(sd_run: Callable[..., dict],
                                                        tmp_path: Path,
                                                        models: dict[str, Path]) -> None:
    """Two nodes of two classes: the label space is 4 of the 10 classes (dataset ids not
    0..3), and the judge picks among those 4 prompts, in the label space's order."""
    results = sd_run("federation.rounds=1", "federation.partition.num_nodes=2",
                     "federation.partition.classes_per_node=2", "images.per_class=2")
    space = list(results["per_class"])
    assert len(space) == 4
    folder = tmp_path / "run" / "images" / "round_001" / "test" / "global"
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == 8
    picked = judge_predictions(models["judge"], pngs, class_prompts(space, "a photo of {name}"))
    truth = [space.index(p.stem.rsplit("_", 1)[0]) for p in pngs]
    final = results["final"]
    assert final["images/acc"] == pytest.approx(
        sum(p == t for p, t in zip(picked, truth, strict=True)) / len(truth))
    assert final["images/macro_f1"] == pytest.approx(f1_score(truth, picked, average="macro"))


def test_the_oracle_renders_the_class_prompts(sd_run: Callable[..., dict], tmp_path: Path,
                                              models: dict[str, Path]) -> None:
    """images.source=prompt renders each class's own conditioning: the image of a class is the
    one the pipeline draws from the prompt's text with the same noise."""
    from diffusers import StableDiffusionPipeline

    from flcore.visual.renderer import hash_name

    results = sd_run("federation.rounds=1", "images.source=prompt", "images.guidance=1.0")
    assert "images/acc" in results["final"]
    name = "rising_chirp"
    png = tmp_path / "run" / "images" / "round_001" / "test" / "global" / f"{name}_01.png"
    pipe = StableDiffusionPipeline.from_pretrained(models["sd"], safety_checker=None)
    seed = hash_name(f"test/{name}_01")  # images.seed=0: split, class and index only
    image = pipe(f"the sound of {name.replace('_', ' ')}", height=32, width=32,
                 num_inference_steps=2, guidance_scale=1.0, output_type="np",
                 generator=torch.Generator().manual_seed(seed)).images[0]
    saved = torch.from_numpy(np.asarray(Image.open(png).convert("RGB"), dtype=np.float32) / 255)
    assert (saved - torch.from_numpy(image)).abs().max() <= 1 / 255 + 1e-6


def test_synthetic_samples_render_through_the_adapter(sd_run: Callable[..., dict],
                                                      tmp_path: Path) -> None:
    """images.source=synthetic: per_class generator samples each node shared, per class."""
    results = sd_run("federation.rounds=1", "images.source=synthetic", "generator=per_class",
                     "generator.training_epochs=2", "generator.hidden_dim=16",
                     "generator.latent_dim=4", "images.per_class=2")
    folder = tmp_path / "run" / "images" / "round_001" / "synthetic" / "global"
    names = {c for node in results["partition"]["nodes"] for c in node["classes"]}
    assert sorted(p.stem for p in folder.glob("*.png")) == sorted(
        f"{c}_{i:02d}" for c in names for i in (1, 2))
    assert "images/acc" in results["final"] and "images/val/acc" not in results["final"]


def test_a_run_renders_from_its_checkpoint_offline(run_config: Callable[..., dict],
                                                   sd_run: Callable[..., dict], tmp_path: Path,
                                                   models: dict[str, Path]) -> None:
    """scripts/render.py redraws a run's last images from its checkpoint bit for bit, and
    renders a run trained without the pipeline (images=none) afterwards."""
    rendered = sd_run("federation.rounds=1")
    folder = tmp_path / "run" / "images" / "round_001"
    before = {p.name: p.read_bytes() for p in (folder / "test" / "global").glob("*.png")}
    overrides = [f"images.path={models['sd']}", f"images.judge_path={models['judge']}",
                 "images.height=32", "images.width=32", "images.steps=2", "images.dtype=fp32"]
    again = render_run(tmp_path / "run", overrides)
    assert {k: v for k, v in rendered["final"].items() if "images/" in k} == again
    assert {p.name: p.read_bytes() for p in (folder / "test" / "global").glob("*.png")} == before
    assert json.loads((folder / "metrics.json").read_text()) == again

    run_config(*FAST, "text_encoder=clip", "text_encoder.output=sequence",
               f"text_encoder.path={models['sd']}", "federation.rounds=1", folder="plain")
    assert not (tmp_path / "plain" / "images").exists()
    script = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "render.py"), str(tmp_path / "plain"),
         "images=sd", "device=cpu", *overrides], capture_output=True, text=True,
        timeout=HANG_GUARD_S, check=False)
    assert script.returncode == 0, script.stderr
    assert "images/acc" in script.stdout
    assert len(list((tmp_path / "plain" / "images" / "round_001" / "test" / "global").glob(
        "*.png"))) == 10


def test_render_script_bad_input_is_one_line(tmp_path: Path, models: dict[str, Path]) -> None:
    (tmp_path / "run").mkdir()
    script = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "render.py"), str(tmp_path / "run"),
         "images=sd"], capture_output=True, text=True, timeout=HANG_GUARD_S, check=False)
    assert script.returncode == 1
    assert script.stderr.strip() == (
        f"error: {tmp_path / 'run'}: no checkpoint in {tmp_path / 'run' / 'checkpoints'}; "
        "rendering needs a run saved with checkpoint.every > 0")


def test_flux_run_renders_with_pooled_and_t5_conditioning(run_config: Callable[..., dict],
                                                          models: dict[str, Path],
                                                          tmp_path: Path) -> None:
    results = run_config(*FAST, "+experiment=synthetic_flux", f"images.path={models['flux']}",
                         f"images.judge_path={models['judge']}", "text_encoder.max_length=24",
                         "federation.rounds=1")
    assert "images/acc" in results["final"] and "global/sequence_acc" in results["final"]
    assert len(list((tmp_path / "run" / "images" / "round_001" / "test" / "global").glob(
        "*.png"))) == 10


@pytest.mark.parametrize("training", [
    ("generator=none",),  # FedAvg
    pytest.param(("server.adapter_training=kd", "generator.training_epochs=3",
                  "generator.hidden_dim=16", "generator.latent_dim=4"),
                 marks=pytest.mark.slow),  # the global adapter distilled from the clients' outputs
])
def test_the_sequence_head_learns_class_conditioning(run_config: Callable[..., dict],
                                                     training: tuple[str, ...]) -> None:
    """MiniLM token sequences as targets: the global head picks the clip's class sequence
    well above chance (1/10) and above the same run with the head's loss off."""
    base = ("logger=[csv]", "audio_encoder=mfcc", "checkpoint.every=0", *training,
            "text_encoder.output=sequence", "text_encoder.max_length=16", "federation.rounds=6")
    trained = run_config(*base, folder="trained")["final"]["global/sequence_acc"]
    off = run_config(*base, "adapter.sequence_weight=0", folder="off")["final"]
    assert trained >= 0.2 and trained >= off["global/sequence_acc"] + 0.1


@pytest.mark.parametrize(("overrides", "message"), [
    (("images.path={missing}",), r"^images\.path={missing}: no such folder"),
    (("images.path={flux}",), r"^images\.path=\S+: it holds a FluxPipeline, not the "
     r"StableDiffusionPipeline that images\.pipeline=sd needs; set images\.pipeline=flux"),
    (("images.dtype=fp16",), r"^images\.dtype=fp16: half precision diffusion runs on a GPU only"),
    (("text_encoder.path={other}",),
     r"^images\.pipeline=sd: the pipeline expects conditioning of 77 tokens x 32 but the "
     r"adapter gives 77 x 16"),
])
def test_bad_rendering_setups_stop_before_any_round(sd_run: Callable[..., dict], tmp_path: Path,
                                                    overrides: tuple[str, ...], message: str,
                                                    models: dict[str, Path]) -> None:
    """A missing pipeline, one of the other kind, half precision on the CPU (all before any data
    is read), or a text encoder whose sequences do not fit the pipeline (when it loads): one
    error before round 1, no checkpoint."""
    other = save_tiny_sd(tmp_path / "narrow", text_width=16)
    filled = [o.format(missing=tmp_path / "absent", other=other, flux=models["flux"])
              for o in overrides]
    with pytest.raises(ConfigError, match=message.format(missing=tmp_path / "absent")):
        sd_run(*filled)
    assert not (tmp_path / "run" / "checkpoints").exists()
    timings = json.loads((tmp_path / "run" / "results.json").read_text())["timings"]
    assert ("embedding_s" in timings) == ("text_encoder.path" in overrides[0])


def test_at_most_log_limit_images_reach_the_tracker(sd_run: Callable[..., dict],
                                                    tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """20 images a round (global and the nodes' own), 3 logged a round; all saved."""
    from flcore.tracking import CsvTracker

    logged: list[tuple[str, int]] = []
    monkeypatch.setattr(CsvTracker, "log_image",
                        lambda self, key, path, step: logged.append((key, step)))
    sd_run("federation.rounds=2", "images.every=1", "images.nodes=true", "images.log_limit=3")
    images = [(key, step) for key, step in logged if key.startswith("images/")]
    assert [step for _, step in images] == [1, 1, 1, 2, 2, 2]
    assert all(key.startswith("images/test/") for key, _ in images)
    assert len(list((tmp_path / "run" / "images" / "round_002").rglob("*.png"))) == 20


def test_a_batch_that_ran_out_of_memory_stays_small(sd_run: Callable[..., dict],
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A GPU that holds 2 images at once (simulated: the pipeline raises torch's out-of-memory
    error above 2): the first set halves 4 -> 2 once, and every later set and round starts at
    2, so the run warns once and renders every image."""
    from diffusers import StableDiffusionPipeline

    real = StableDiffusionPipeline.__call__

    def tight(self: StableDiffusionPipeline, **kwargs: Any) -> Any:
        if len(kwargs["prompt_embeds"]) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", tight)
    with caplog.at_level(logging.WARNING, logger="flcore.visual.pipelines"):
        results = sd_run("federation.rounds=2", "images.every=1", "images.nodes=true")
    assert caplog.text.count("ran out of GPU memory") == 1
    assert "images/acc" in results["final"]


def test_a_nan_image_is_named_and_loses_no_round(sd_run: Callable[..., dict], tmp_path: Path,
                              models: dict[str, Path]) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(models["sd"], safety_checker=None)
    with torch.no_grad():
        pipe.vae.decoder.conv_out.weight.fill_(float("nan"))
    pipe.save_pretrained(tmp_path / "broken")
    with pytest.raises(TrainingError, match=r"^image round_001/test/global/\w+_01: the pipeline "
                                            r"returned NaN pixels"):
        sd_run("federation.rounds=1", f"images.path={tmp_path / 'broken'}",
               f"text_encoder.path={models['sd']}")
    # Rendering follows the round's checkpoint: the failure lost no training.
    assert (tmp_path / "run" / "checkpoints" / "round_0001.pt").is_file()


def test_flux_pooled_conditioning_is_rescaled_to_the_prompts_norm(
        make_config: Callable[..., Any], models: dict[str, Path], tmp_path: Path) -> None:
    """Flux reads CLIP's unnormalised pooled output: the adapter's pooled vector (trained on
    the normalised one) keeps its direction and takes the class prompts' mean norm."""
    from flcore.clients.protocol import SharedTensors
    from flcore.clients.training import build_adapter
    from flcore.config import validate
    from flcore.tracking import Trackers
    from flcore.visual.renderer import Renderer, RenderSet

    config = validate(make_config(*FAST, "+experiment=synthetic_flux",
                                  f"images.path={models['flux']}", "text_encoder.max_length=8"))
    targets = ClipT5TextEncoder(config.text_encoder).encode(PROMPTS)
    gen = torch.Generator().manual_seed(0)
    shared = SharedTensors(torch.randn(6, 4, 8, generator=gen), torch.arange(6) % 3,
                           targets.pooled, torch.arange(3), ["a", "b", "c"], targets.sequence,
                           targets.pooled_raw)
    renderer = Renderer(config, shared, tmp_path, Trackers([]))
    model = build_adapter(shared, config.adapter)
    picked = RenderSet("global", "test", model.state_dict(), shared.tokens, shared.labels,
                       torch.zeros(6, dtype=torch.long))
    sequence, pooled = renderer.conditioning(model, picked)
    assert pooled is not None and sequence.shape == (6, 8, 32)
    norm = targets.pooled_raw.norm(dim=-1).mean()
    torch.testing.assert_close(pooled.norm(dim=-1), norm.expand(6))
    torch.testing.assert_close(F.normalize(pooled, dim=-1),
                               F.normalize(model.eval().outputs(shared.tokens)[0], dim=-1))
