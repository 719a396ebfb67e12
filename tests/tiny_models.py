"""Tiny random-weight diffusion pipelines and CLIP judges, built offline from configs with the
real diffusers/transformers classes and saved with ``save_pretrained`` (for tests)."""

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import CLIPTextConfig

MERGES = ("t h", "th e</w>", "o f</w>", "a n", "i n", "o n</w>", "e r", "o g</w>", "a i")
"""A handful of BPE merges over common letters (each result is also in the vocabulary)."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level map: printable bytes stand for themselves, the rest map to 256 + n."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def write_clip_tokenizer(folder: Path) -> Path:
    """A tiny byte-level CLIP BPE tokenizer (77 tokens, padded with ``<|endoftext|>``)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    tokens = [*chars, *(c + "</w>" for c in chars), *(m.replace(" ", "") for m in MERGES),
              "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77,
                                              pad_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    return folder


def _clip_text_config(folder: Path, width: int) -> "CLIPTextConfig":
    """A two-layer CLIP text tower of ``width`` over the tokenizer in ``folder``."""
    from transformers import CLIPTextConfig

    vocab = json.loads((folder / "vocab.json").read_text())
    return CLIPTextConfig(hidden_size=width, intermediate_size=37, num_attention_heads=4,
                          num_hidden_layers=2, vocab_size=len(vocab), max_position_embeddings=77,
                          projection_dim=width, bos_token_id=vocab["<|startoftext|>"],
                          eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])


def save_tiny_sd(folder: Path, text_width: int = 32, sample_size: int = 16) -> Path:
    """A Stable Diffusion pipeline saved to ``folder``: images of ``2 * sample_size`` pixels a side
    (32x32 by default), conditioned on 77 CLIP tokens of ``text_width``."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    write_clip_tokenizer(folder / "tokenizer")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=text_width,
        attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], norm_num_groups=8,
        sample_size=2 * sample_size)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    text_encoder = CLIPTextModel(_clip_text_config(folder / "tokenizer", text_width))
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, scheduler=scheduler, text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def save_tiny_clip_judge(folder: Path, width: int = 32, image_size: int = 32) -> Path:
    """A CLIP model with its processor (tokenizer + image processor) saved to ``folder``."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
        CLIPVisionConfig,
    )

    write_clip_tokenizer(folder)
    torch.manual_seed(0)
    vision = CLIPVisionConfig(image_size=image_size, patch_size=8, hidden_size=width,
                              intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                              projection_dim=width)
    config = CLIPConfig(text_config=_clip_text_config(folder, width).to_dict(),
                        vision_config=vision.to_dict(), projection_dim=width)
    CLIPModel(config).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": image_size},
                                crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=images,
                  tokenizer=CLIPTokenizer.from_pretrained(folder)).save_pretrained(folder)
    return folder


def write_t5_tokenizer(folder: Path) -> Path:
    """A tiny Unigram T5 tokenizer over letters and a few words (``<pad>``, ``</s>``, ``<unk>``)."""
    from transformers import T5Tokenizer

    words = ["▁", *(f"▁{w}" for w in ("a", "the", "of", "dog", "rain", "photo", "sound")),
             *"abcdefghijklmnopqrstuvwxyz"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *((w, -float(len(w))) for w in words)]
    T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512).save_pretrained(folder)
    return folder


def save_tiny_flux(folder: Path, width: int = 32) -> Path:
    """A Flux pipeline (CLIP pooled + T5 sequence conditioning, 1-channel VAE) in ``folder``."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    write_clip_tokenizer(folder / "tokenizer")
    write_t5_tokenizer(folder / "tokenizer_2")
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=width, pooled_projection_dim=width,
        axes_dims_rope=[4, 4, 8])
    vae = AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035)
    text_encoder = CLIPTextModel(_clip_text_config(folder / "tokenizer", width))
    tokenizer_2 = T5Tokenizer.from_pretrained(folder / "tokenizer_2")
    t5 = T5Config(vocab_size=len(tokenizer_2), d_model=width, d_kv=8, d_ff=37, num_layers=2,
                  num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0,
                  pad_token_id=0, eos_token_id=1)
    pipe = FluxPipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder_2=T5EncoderModel(t5), tokenizer_2=tokenizer_2)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
