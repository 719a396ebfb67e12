"""The visual layer, run for real on tiny random-weight pipelines: rendering from conditioning,
its errors, the zero-shot CLIP judge and PNG files."""

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusionPipeline
from PIL import Image

from flcore.errors import ConfigError, ResourceError, TrainingError
from flcore.visual.judge import ClipJudge
from flcore.visual.pipelines import (
    check_conditioning,
    conditioning_shape,
    load_pipeline,
    render,
    resolve_weights,
    save_png,
)
from tiny_models import save_tiny_clip_judge, save_tiny_flux, save_tiny_sd

CPU = torch.device("cpu")
FAST = {"steps": 2, "guidance": 7.5, "height": 32, "width": 32}
NAMES = ["round_002/test/global/dog_01", "round_002/test/global/rain_01",
         "round_002/test/global/siren_01"]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run many times faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("sd") / "sd")


@pytest.fixture(scope="module")
def sd(sd_folder: Path) -> DiffusionPipeline:
    return load_pipeline("sd", str(sd_folder), CPU, torch.float32)


@pytest.fixture(scope="module")
def sequence() -> torch.Tensor:
    """Conditioning of three images in the tiny SD's space ``[3, 77, 32]``."""
    return torch.randn(3, 77, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def one_by_one(sd: DiffusionPipeline, sequence: torch.Tensor) -> torch.Tensor:
    """The three images rendered one at a time: the reference of every batching."""
    return render(sd, "sd", sequence, None, [0, 1, 2], NAMES, **FAST, batch_size=1)


def test_images_depend_only_on_their_seed_and_conditioning(
        sd: DiffusionPipeline, sequence: torch.Tensor, one_by_one: torch.Tensor) -> None:
    assert one_by_one.shape == (3, 3, 32, 32)
    assert one_by_one.dtype == torch.float32 and one_by_one.device == CPU
    assert torch.isfinite(one_by_one).all()
    assert one_by_one.min() >= 0 and one_by_one.max() <= 1
    batched = render(sd, "sd", sequence, None, [0, 1, 2], NAMES, **FAST, batch_size=3)
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=0)
    alone = render(sd, "sd", sequence[1:2], None, [1], NAMES[1:2], **FAST, batch_size=2)
    torch.testing.assert_close(alone[0], one_by_one[1], atol=1e-5, rtol=0)
    same = sequence[:1].expand(3, -1, -1)
    seeds = render(sd, "sd", same, None, [0, 0, 5], NAMES, **FAST, batch_size=3)
    torch.testing.assert_close(seeds[0], seeds[1], atol=1e-5, rtol=0)
    assert (seeds[0] - seeds[2]).abs().max() > 0.01


def test_own_text_encoder_conditioning_renders_as_the_pipeline_would(
        sd: DiffusionPipeline) -> None:
    """The negative embedding computed once equals the one the pipeline computes itself."""
    sequence = sd.encode_prompt(["a photo of a dog", "rain"], CPU, 1, False)[0]
    assert conditioning_shape(sd, "sd") == {"sequence": (77, 32)}
    check_conditioning(sd, "sd", tuple(sequence.shape[1:]), None)
    images = render(sd, "sd", sequence, None, [3, 4], NAMES[:2], **FAST, batch_size=2)
    direct = sd(prompt_embeds=sequence, num_inference_steps=2, guidance_scale=7.5, height=32,
                width=32, output_type="pt",
                generator=[torch.Generator().manual_seed(s) for s in (3, 4)]).images
    torch.testing.assert_close(images, direct, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(77, 16), (16, 32)])
def test_conditioning_that_does_not_fit_says_what_fits(sd: DiffusionPipeline,
                                                       shape: tuple[int, int]) -> None:
    with pytest.raises(ConfigError, match=rf"images\.pipeline=sd: the pipeline expects "
                                          rf"conditioning of 77 tokens x 32 but the adapter "
                                          rf"gives {shape[0]} x {shape[1]}; .*text_encoder\.path"):
        check_conditioning(sd, "sd", shape, None)
    with pytest.raises(ConfigError, match="expects conditioning of 77 tokens x 32"):
        render(sd, "sd", torch.zeros(1, *shape), None, [0], NAMES[:1], **FAST, batch_size=1)


def test_nan_weights_name_the_image(sd_folder: Path, sequence: torch.Tensor) -> None:
    pipe = load_pipeline("sd", str(sd_folder), CPU, torch.float32)
    with torch.no_grad():
        pipe.unet.conv_in.weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"^image round_002/test/global/dog_01: the pipeline "
                                            r"returned NaN pixels; render in fp32 or bf16 "
                                            r"\(images\.dtype"):
        render(pipe, "sd", sequence, None, [0, 1, 2], NAMES, **FAST, batch_size=3)


def test_nan_conditioning_names_the_image(sd: DiffusionPipeline, sequence: torch.Tensor) -> None:
    broken = sequence.clone()
    broken[1, 5, 3] = float("nan")
    with pytest.raises(TrainingError, match=r"^image round_002/test/global/rain_01: its "
                                            r"conditioning has NaN"):
        render(sd, "sd", broken, None, [0, 1, 2], NAMES, **FAST, batch_size=3)


def _out_of_memory_above(monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    """Make the SD pipeline raise torch.OutOfMemoryError for batches larger than ``limit``."""
    real = StableDiffusionPipeline.__call__

    def tight(self: StableDiffusionPipeline, **kwargs: object) -> object:
        if len(kwargs["prompt_embeds"]) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", tight)


def test_out_of_memory_halves_the_batch(sd: DiffusionPipeline, sequence: torch.Tensor,
                                        one_by_one: torch.Tensor,
                                        monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    _out_of_memory_above(monkeypatch, 1)
    sizes: list[int] = []
    with caplog.at_level(logging.WARNING, logger="flcore.visual.pipelines"):
        images = render(sd, "sd", sequence, None, [0, 1, 2], NAMES, **FAST, batch_size=4,
                        shrunk=sizes.append)
    torch.testing.assert_close(images, one_by_one, atol=1e-5, rtol=0)
    assert "rendering 4 images of 32x32 at once ran out of GPU memory; trying 2" in caplog.text
    assert "trying 1" in caplog.text
    assert sizes == [2, 1]  # what the renderer starts from next time


def test_out_of_memory_for_one_image_is_a_resource_error(
        sd: DiffusionPipeline, sequence: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    _out_of_memory_above(monkeypatch, 0)
    with pytest.raises(ResourceError, match=r"^images\.batch_size: rendering one 32x32 image "
                                            r"runs out of GPU memory; lower images\.height"):
        render(sd, "sd", sequence, None, [0, 1, 2], NAMES, **FAST, batch_size=2)


def test_absent_pipeline_folders_say_how_to_get_them(sd_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^images\.path=.*/nowhere: no such folder; .*"
                                          r"hf download MODEL_ID --local-dir"):
        load_pipeline("sd", str(tmp_path / "nowhere"), CPU, torch.float32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^images\.path=.*/empty: no model_index\.json in "):
        load_pipeline("sd", str(tmp_path / "empty"), CPU, torch.float32)
    with pytest.raises(ConfigError, match=r"^images\.path=.*: it holds a StableDiffusionPipeline, "
                                          r"not the FluxPipeline that images\.pipeline=flux "
                                          r"needs; set images\.pipeline=sd"):
        load_pipeline("flux", str(sd_folder), CPU, torch.float32)
    corrupt = shutil.copytree(sd_folder, tmp_path / "corrupt")
    (corrupt / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 100)
    with pytest.raises(ConfigError, match=r"^images\.path=.*/corrupt: the StableDiffusionPipeline "
                                          r"in .* does not load \(.*\); its weight files are "
                                          r"missing or corrupt"):
        load_pipeline("sd", str(corrupt), CPU, torch.float32)


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache in place of the user's (working folder: ``tmp_path``)."""
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.chdir(tmp_path)
    return hub


def test_model_ids_come_from_the_local_cache_only(sd_folder: Path, hub_cache: Path) -> None:
    with pytest.raises(ConfigError, match=r"^images\.path=nobody/absent: no such folder, and no "
                                          r"such model in the local Hugging Face cache .*"
                                          r"hf download nobody/absent --local-dir DIR"):
        load_pipeline("sd", "nobody/absent", CPU, torch.float32)
    commit = "0" * 40
    repo = hub_cache / "models--tiny--sd"
    shutil.copytree(sd_folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert resolve_weights("tiny/sd", "images.path") == repo / "snapshots" / commit
    assert load_pipeline("sd", "tiny/sd", CPU, torch.float32).unet is not None


@pytest.fixture(scope="module")
def judge_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_clip_judge(tmp_path_factory.mktemp("judge") / "clip")


def test_judge_folders_must_hold_a_clip_model(sd_folder: Path, judge_folder: Path,
                                              tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^images\.judge_path=.*/text_encoder: .* holds a "
                                          r"clip_text_model model, not a CLIP model"):
        ClipJudge(str(sd_folder / "text_encoder"), CPU)
    with pytest.raises(ConfigError, match=r"^images\.judge_path=.*: no config\.json in "):
        ClipJudge(str(sd_folder), CPU)
    with pytest.raises(ConfigError, match=r"^images\.judge_path=.*/nowhere: no such folder"):
        ClipJudge(str(tmp_path / "nowhere"), CPU)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(judge_folder / name, bare / name)
    with pytest.raises(ConfigError, match=r"^images\.judge_path=.*/bare: the CLIP model or its "
                                          r"processor in .* does not load \(.*preprocessor"):
        ClipJudge(str(bare), CPU)


def test_judge_scores_are_clip_cosine_similarities(judge_folder: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import CLIPModel, CLIPProcessor

    monkeypatch.setattr("flcore.visual.judge.BATCH", 3)
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    prompts = ["a photo of a dog", "a photo of rain", "a photo of the siren"]
    scores = ClipJudge(str(judge_folder), CPU).scores(images, prompts)
    assert scores.shape == (5, 3) and scores.dtype == torch.float32
    model = CLIPModel.from_pretrained(judge_folder).eval()
    inputs = CLIPProcessor.from_pretrained(judge_folder)(
        text=prompts, images=images, return_tensors="pt", padding=True, do_rescale=False)
    processor = CLIPProcessor.from_pretrained(judge_folder).image_processor
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    torch.testing.assert_close(inputs.pixel_values, (images - mean) / std, atol=0.02, rtol=0)
    with torch.no_grad():
        out = model(**inputs)
    torch.testing.assert_close(scores, out.logits_per_image / model.logit_scale.exp(),
                               atol=1e-5, rtol=0)
    larger = torch.nn.functional.interpolate(images, size=64)
    assert ClipJudge(str(judge_folder), CPU).scores(larger, prompts[:2]).shape == (5, 2)


def test_png_round_trip(tmp_path: Path) -> None:
    image = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(2))
    path = tmp_path / "round_002" / "test" / "dog_01.png"
    save_png(image, path)
    expected = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(np.asarray(Image.open(path)), expected)
    assert [p.name for p in path.parent.iterdir()] == ["dog_01.png"]


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_flux(tmp_path_factory.mktemp("flux") / "flux")


@pytest.fixture(scope="module")
def flux(flux_folder: Path) -> DiffusionPipeline:
    return load_pipeline("flux", str(flux_folder), CPU, torch.float32)


def test_flux_renders_from_t5_sequence_and_pooled_conditioning(flux: DiffusionPipeline,
                                                               flux_folder: Path) -> None:
    assert conditioning_shape(flux, "flux") == {"sequence_width": 32, "pooled": 32}
    generator = torch.Generator().manual_seed(0)
    sequence, pooled = torch.randn(2, 16, 32, generator=generator), torch.randn(2, 32)
    options = {**FAST, "guidance": 3.5}
    images = render(flux, "flux", sequence, pooled, [0, 1], NAMES[:2], **options, batch_size=2)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1
    alone = render(flux, "flux", sequence[1:], pooled[1:], [1], NAMES[1:2], **options,
                   batch_size=1)
    torch.testing.assert_close(alone[0], images[1], atol=1e-5, rtol=0)
    whole = FluxPipeline.from_pretrained(flux_folder)  # with the text encoders load_pipeline skips
    own, own_pooled, _ = whole.encode_prompt(["a dog", "rain"], None, max_sequence_length=8)
    assert render(flux, "flux", own, own_pooled, [0, 1], NAMES[:2], **options,
                  batch_size=2).shape == (2, 3, 32, 32)
    with pytest.raises(ConfigError, match=r"images\.pipeline=flux: the pipeline expects token "
                                          r"sequences of width 32 and a pooled vector of width "
                                          r"32 but the adapter gives widths 16 and 32"):
        check_conditioning(flux, "flux", (16, 16), 32)


def test_pipelines_load_in_the_dtype_asked_for(sd_folder: Path) -> None:
    """images.dtype reaches the weights (bf16 works on the CPU; fp16 is refused there)."""
    pipe = load_pipeline("sd", str(sd_folder), CPU, torch.bfloat16)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.bfloat16}


def test_flux_loads_without_its_text_encoders(flux: DiffusionPipeline) -> None:
    """Flux renders from embeddings: its T5 and CLIP stay on disk."""
    assert flux.text_encoder is None and flux.text_encoder_2 is None
