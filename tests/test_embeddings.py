"""The embedding cache: hits, misses on any changed input, atomic writes, bad entries,
shard checksums, bypass, bad folders."""

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import flcore.files
from flcore.config import AudioEncoderConfig, AudioEncoderName, TextEncoderConfig
from flcore.data.embeddings import EmbeddingCache, embed_audio, embed_text
from flcore.data.esc50 import load_esc50
from flcore.data.shards import shard_digest
from flcore.encoders.audio import MfccEncoder
from flcore.encoders.text import MiniLMEncoder


def mfcc(**kwargs) -> MfccEncoder:
    return MfccEncoder(AudioEncoderConfig(name=AudioEncoderName.mfcc, **kwargs))


def embed(root: Path, cache: EmbeddingCache, **kwargs) -> tuple[torch.Tensor, bool]:
    return embed_audio(load_esc50(root), mfcc(**kwargs), cache, batch_size=7, progress=False)


def entries(folder: Path) -> list[Path]:
    """The sharded audio entries (one folder per key) under a cache folder."""
    return sorted(p for p in folder.iterdir() if p.is_dir())


def shard(folder: Path) -> Path:
    """The one shard of the one audio entry under ``folder`` (30 clips < the shard size)."""
    [path] = folder.glob("*/shard-*.pt")
    return path


def test_second_call_hits_the_cache_with_identical_tensors(tiny_esc50: Path,
                                                           tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path / "cache")
    first, hit1 = embed(tiny_esc50, cache)
    second, hit2 = embed(tiny_esc50, cache)
    assert (hit1, hit2) == (False, True)
    assert first.shape == (30, 8, 120)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    [entry] = entries(tmp_path / "cache")
    assert sorted(p.name for p in entry.iterdir()) == ["manifest.json", "shard-00000.pt"]


def test_changed_encoder_settings_or_data_miss(tiny_esc50: Path, tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path / "cache")
    embed(tiny_esc50, cache)
    assert embed(tiny_esc50, cache, tokens=4)[1] is False
    assert embed(tiny_esc50, cache, n_mfcc=13)[1] is False
    assert embed(tiny_esc50, cache)[1] is True
    victim = sorted((tiny_esc50 / "audio").iterdir())[0]
    sf.write(victim, 0.5 * np.ones(22050, dtype=np.float32), 44100, subtype="PCM_16")
    _, hit = embed(tiny_esc50, cache)
    assert hit is False
    assert len(entries(tmp_path / "cache")) == 4


def test_crash_mid_write_leaves_no_entry(tiny_esc50: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cache = EmbeddingCache(tmp_path / "cache")

    def killed(src: str, dst: str) -> None:
        raise KeyboardInterrupt("killed between write and rename")

    monkeypatch.setattr(flcore.files.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        embed(tiny_esc50, cache)
    monkeypatch.undo()
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []
    assert embed(tiny_esc50, cache)[1] is False
    assert embed(tiny_esc50, cache)[1] is True


def test_truncated_entry_is_recomputed(tiny_esc50: Path, tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    cache = EmbeddingCache(tmp_path / "cache")
    reference, _ = embed(tiny_esc50, cache)
    entry = shard(tmp_path / "cache")
    entry.write_bytes(entry.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING):
        again, hit = embed(tiny_esc50, cache)
    assert hit is False and "unreadable cache entry" in caplog.text
    torch.testing.assert_close(again, reference)
    assert embed(tiny_esc50, cache)[1] is True


def rewrite_entry(path: Path, field: str, change) -> None:
    """Store a loadable entry whose ``field`` was changed, under the same key."""
    entry = torch.load(path, weights_only=True)
    entry[field] = change(entry[field])
    torch.save(entry, path)


def with_nan(tensor: torch.Tensor) -> torch.Tensor:
    tensor[0, 0, 0] = float("nan")
    return tensor


@pytest.mark.parametrize(("change", "problem"), [
    (with_nan, "tokens: NaN/inf values"),
    (lambda t: t[:-1], "tokens: shape [29, 8, 120], expected [30, 8, 120]"),
    (lambda t: t[:, :, :7], "tokens: shape [30, 8, 7], expected [30, 8, 120]"),
    (lambda t: t[:, 0], "tokens: shape [30, 120], expected [30, 8, 120]"),
    (lambda t: t.tolist(), "tokens: not a float tensor (list)"),
])
def test_bad_but_loadable_audio_entry_is_recomputed(tiny_esc50: Path, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture, change,
                                                    problem: str) -> None:
    cache = EmbeddingCache(tmp_path / "cache")
    reference, _ = embed(tiny_esc50, cache)
    rewrite_entry(shard(tmp_path / "cache"), "tokens", change)
    with caplog.at_level(logging.WARNING):
        again, hit = embed(tiny_esc50, cache)
    assert hit is False and "bad cache entry" in caplog.text and problem in caplog.text
    assert torch.isfinite(again).all()
    torch.testing.assert_close(again, reference)
    assert embed(tiny_esc50, cache)[1] is True


def test_a_flipped_bit_in_a_shard_is_caught_by_its_checksum(
        tiny_esc50: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The lowest mantissa bit of one float on disk: the shard still loads, finite and of the
    right shape, so only the checksum tells it from the stored tokens."""
    cache = EmbeddingCache(tmp_path / "cache")
    reference, _ = embed(tiny_esc50, cache)
    path = shard(tmp_path / "cache")
    blob = bytearray(path.read_bytes())
    start = blob.find(reference.numpy().tobytes())
    assert start > 0 and reference.dtype == torch.float32
    blob[start + 4 * 1000] ^= 0x01  # flat element 1000 = [1, 0, 40]
    path.write_bytes(bytes(blob))
    flipped = torch.load(path, weights_only=True)["tokens"]
    assert torch.isfinite(flipped).all()
    assert (flipped != reference).nonzero().tolist() == [[1, 0, 40]]
    with caplog.at_level(logging.WARNING):
        again, hit = embed(tiny_esc50, cache)
    assert hit is False
    assert f"Ignoring bad cache entry {path} (checksum mismatch: stored sha256" in caplog.text
    torch.testing.assert_close(again, reference, rtol=0, atol=0)
    assert embed(tiny_esc50, cache)[1] is True


def test_a_shard_without_a_checksum_is_recomputed(tiny_esc50: Path, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    cache = EmbeddingCache(tmp_path / "cache")
    reference, _ = embed(tiny_esc50, cache)
    path = shard(tmp_path / "cache")
    entry = torch.load(path, weights_only=True)
    del entry["sha256"]
    torch.save(entry, path)
    with caplog.at_level(logging.WARNING):
        again, hit = embed(tiny_esc50, cache)
    assert hit is False
    assert (f"Ignoring bad cache entry {path} (no checksum (written before shards carried "
            "one)); recomputing") in caplog.text
    torch.testing.assert_close(again, reference, rtol=0, atol=0)
    assert "sha256" in torch.load(path, weights_only=True)


def test_shard_digest_hashes_dtype_shape_bytes_and_names() -> None:
    tokens = torch.tensor([[[1.0]], [[-2.0]]])
    by_hand = hashlib.sha256(b"torch.float32\0[2, 1, 1]\0"
                             + np.array([1.0, -2.0], dtype="<f4").tobytes() + b"a.wav\0b.wav")
    assert shard_digest(tokens, ["a.wav", "b.wav"]) == by_hand.hexdigest()
    assert shard_digest(tokens, ["a.wav", "c.wav"]) != by_hand.hexdigest()
    assert shard_digest(tokens.double(), ["a.wav", "b.wav"]) != by_hand.hexdigest()


def test_entry_that_is_not_a_dict_is_recomputed(tiny_esc50: Path, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    cache = EmbeddingCache(tmp_path / "cache")
    reference, _ = embed(tiny_esc50, cache)
    entry = shard(tmp_path / "cache")
    torch.save(reference, entry)
    with caplog.at_level(logging.WARNING):
        again, hit = embed(tiny_esc50, cache)
    assert hit is False and "(a Tensor, not a dict)" in caplog.text
    torch.testing.assert_close(again, reference)


def test_bad_but_loadable_text_entry_is_recomputed(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    cache = EmbeddingCache(tmp_path)
    encoder = MiniLMEncoder(TextEncoderConfig())
    reference = embed_text(["dog", "rain"], encoder, "the sound of {name}", cache)[0].pooled
    entry = next(tmp_path.glob("*.pt"))
    rewrite_entry(entry, "embeddings", lambda t: t.fill_(float("inf")))
    with caplog.at_level(logging.WARNING):
        again, hit = embed_text(["dog", "rain"], encoder, "the sound of {name}", cache)
    assert hit is False and "embeddings: NaN/inf values" in caplog.text
    torch.testing.assert_close(again.pooled, reference)
    rewrite_entry(entry, "embeddings", lambda t: t[:1])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert embed_text(["dog", "rain"], encoder, "the sound of {name}", cache)[1] is False
    assert "shape [1, 384], expected [2, *]" in caplog.text


def test_bypass_writes_nothing(tiny_esc50: Path, tmp_path: Path) -> None:
    cache = EmbeddingCache(None)
    assert embed(tiny_esc50, cache)[1] is False
    assert embed(tiny_esc50, cache)[1] is False
    assert not cache.enabled


def test_unwritable_cache_folder_warns_and_runs_without(tiny_esc50: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        cache = EmbeddingCache(blocker / "cache")
    assert not cache.enabled
    assert "is not writable: running without the embedding cache" in caplog.text
    assert embed(tiny_esc50, cache)[0].shape == (30, 8, 120)


def test_text_embeddings_are_cached_per_prompt_template(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path)
    encoder = MiniLMEncoder(TextEncoderConfig())
    names = ["dog", "sea_waves"]
    first, hit1 = embed_text(names, encoder, "the sound of {name}", cache)
    second, hit2 = embed_text(names, encoder, "the sound of {name}", cache)
    other, hit3 = embed_text(names, encoder, "a recording of {name}", cache)
    assert (hit1, hit2, hit3) == (False, True, False)
    assert first.pooled.shape == (2, 384)
    torch.testing.assert_close(first.pooled, second.pooled, rtol=0, atol=0)
    assert not torch.allclose(first.pooled, other.pooled)
