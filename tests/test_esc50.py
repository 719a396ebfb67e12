"""The ESC-50 reader: metadata checks, bad files, format conversion and resampling."""

import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import write_esc50
from flcore.config import (
    AudioEncoderConfig,
    AudioEncoderName,
    DatasetConfig,
    DatasetName,
    OnBadFile,
)
from flcore.data import load_dataset
from flcore.data.esc50 import Clip, load_esc50, load_waveform
from flcore.encoders.audio import min_clip_seconds
from flcore.errors import DataError


def test_reads_classes_folds_and_clips(tiny_esc50: Path) -> None:
    dataset = load_esc50(tiny_esc50)
    assert dataset.class_names == ["dog", "rain", "siren"]
    assert len(dataset.clips) == 30
    assert sorted(set(dataset.folds.tolist())) == [1, 2, 3, 4, 5]
    assert np.bincount(dataset.labels).tolist() == [10, 10, 10]


def test_resamples_44k_to_16k(tiny_esc50: Path) -> None:
    dataset = load_esc50(tiny_esc50)
    wave = load_waveform(dataset.path(dataset.clips[0]), 16000)
    assert wave.dtype.is_floating_point and wave.ndim == 1
    assert wave.shape[0] == 16000


def test_stereo_is_averaged_and_8bit_is_converted(tmp_path: Path) -> None:
    t = np.arange(16000) / 16000
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    sf.write(tmp_path / "stereo.wav", np.stack([left, 0.5 * left], 1), 16000, subtype="PCM_16")
    sf.write(tmp_path / "u8.wav", left, 16000, subtype="PCM_U8")
    stereo = load_waveform(tmp_path / "stereo.wav", 16000).numpy()
    np.testing.assert_allclose(stereo, 0.75 * left, atol=1e-4)
    u8 = load_waveform(tmp_path / "u8.wav", 16000).numpy()
    np.testing.assert_allclose(u8, left, atol=1 / 64)


def test_nan_samples_name_the_file(tmp_path: Path) -> None:
    audio = np.zeros(1600, dtype=np.float32)
    audio[10] = np.nan
    sf.write(tmp_path / "nan.wav", audio, 16000, subtype="FLOAT")
    with pytest.raises(DataError, match=r"nan\.wav: contains NaN"):
        load_waveform(tmp_path / "nan.wav", 16000)


def test_out_of_range_float_samples_name_the_file(tmp_path: Path) -> None:
    audio = np.zeros(1600, dtype=np.float32)
    audio[5] = 3.0
    sf.write(tmp_path / "hot.wav", audio, 16000, subtype="FLOAT")
    with pytest.raises(DataError, match=r"hot\.wav: samples outside \[-1, 1\]"):
        load_waveform(tmp_path / "hot.wav", 16000)


def test_missing_root_says_how_to_get_esc50(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_esc50(tmp_path / "nowhere")
    message = str(err.value)
    assert "nowhere: folder not found" in message
    assert "ESC-50" in message and "dataset=synthetic" in message


def test_missing_metadata(tiny_esc50: Path) -> None:
    (tiny_esc50 / "meta" / "esc50.csv").unlink()
    with pytest.raises(DataError, match=r"meta/esc50\.csv not found"):
        load_esc50(tiny_esc50)


def test_wrong_columns_are_named(tiny_esc50: Path) -> None:
    meta = tiny_esc50 / "meta" / "esc50.csv"
    meta.write_text(meta.read_text().replace("category", "label", 1))
    with pytest.raises(DataError, match="lacks column"):
        load_esc50(tiny_esc50)
    meta.write_text("file,fold\nx.wav,1\n")
    with pytest.raises(DataError, match="filename, target, category"):
        load_esc50(tiny_esc50)


def test_non_integer_fold_is_located(tiny_esc50: Path) -> None:
    meta = tiny_esc50 / "meta" / "esc50.csv"
    lines = meta.read_text().splitlines()
    fields = lines[3].split(",")
    fields[1] = "three"
    lines[3] = ",".join(fields)
    meta.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"esc50\.csv:4: fold and target must be integers"):
        load_esc50(tiny_esc50)


@pytest.mark.parametrize(("damage", "problem"), [
    (lambda p: p.unlink(), "file not found"),
    (lambda p: p.write_bytes(b""), "unreadable audio"),
    (lambda p: p.write_bytes(b"RIFF not really a wave file"), "unreadable audio"),
    (lambda p: sf.write(p, np.zeros(0, dtype=np.float32), 16000), "empty file"),
    (lambda p: p.write_bytes(p.read_bytes()[:30]), "unreadable audio"),  # cut inside the header
])
def test_bad_files_stop_the_run_or_are_skipped_and_counted(tiny_esc50: Path, damage,
                                                           problem: str) -> None:
    victim = sorted((tiny_esc50 / "audio").iterdir())[0]
    damage(victim)
    with pytest.raises(DataError) as err:
        load_esc50(tiny_esc50)
    assert victim.name in str(err.value) and problem in str(err.value)
    assert "dataset.on_bad_file=skip" in str(err.value)
    dataset = load_esc50(tiny_esc50, on_bad_file=OnBadFile.skip)
    assert len(dataset.clips) == 29
    assert list(dataset.skipped) == [victim.name]
    assert problem in dataset.skipped[victim.name]


def test_src_file_from_metadata_else_file_name(tmp_path: Path) -> None:
    rows = [("1-100032-A-0.wav", 1, 0, "dog"), ("2-100032-B-0.wav", 2, 0, "dog"),
            ("take_three.wav", 3, 0, "dog")]
    without = load_esc50(write_esc50(tmp_path / "a", rows, src_file_column=False))
    assert [c.src_file for c in without.clips] == ["100032", "100032", "take_three.wav"]
    root = write_esc50(tmp_path / "b", rows[:2])
    meta = root / "meta" / "esc50.csv"
    meta.write_text(meta.read_text().replace("2-100032-B-0.wav,2,0,dog,False,100032",
                                             "2-100032-B-0.wav,2,0,dog,False,777"))
    assert [c.src_file for c in load_esc50(root).clips] == ["100032", "777"]
    assert Clip("3-42-C-7.WAV", 3, 7, "x").src_file == "42"


def test_min_clip_seconds_needs_no_model() -> None:
    assert min_clip_seconds(AudioEncoderConfig()) == pytest.approx(0.96)
    assert min_clip_seconds(AudioEncoderConfig(name=AudioEncoderName.mfcc)) == 0.025
    assert min_clip_seconds(AudioEncoderConfig(name=AudioEncoderName.ast,
                                               path="/no/such/model")) == 0.025


def test_clip_shorter_than_the_encoder_window_is_a_bad_file(tiny_esc50: Path,
                                                            tmp_path: Path) -> None:
    victim = sorted((tiny_esc50 / "audio").iterdir())[0]
    sf.write(victim, np.zeros(441, dtype=np.float32), 44100, subtype="PCM_16")  # 10 ms
    assert len(load_esc50(tiny_esc50).clips) == 30  # no minimum: read as before
    config = DatasetConfig(name=DatasetName.esc50, root=str(tiny_esc50))
    yamnet = min_clip_seconds(AudioEncoderConfig())
    with pytest.raises(DataError) as err:
        load_dataset(config, tmp_path, min_seconds=yamnet)
    message = str(err.value)
    assert "\n" not in message and victim.name in message
    assert "too short (0.010 s; the audio encoder needs at least 0.960 s)" in message
    config.on_bad_file = OnBadFile.skip
    dataset = load_dataset(config, tmp_path, min_seconds=yamnet)
    assert len(dataset.clips) == 29 and list(dataset.skipped) == [victim.name]
    assert "too short" in dataset.skipped[victim.name]
    mfcc = min_clip_seconds(AudioEncoderConfig(name=AudioEncoderName.mfcc))
    skipped = load_dataset(config, tmp_path, min_seconds=mfcc).skipped
    assert "at least 0.025 s" in skipped[victim.name]
    sf.write(victim, np.zeros(22050, dtype=np.float32), 44100, subtype="PCM_16")  # 0.5 s
    assert len(load_dataset(config, tmp_path, min_seconds=mfcc).clips) == 30
    assert list(load_dataset(config, tmp_path, min_seconds=yamnet).skipped) == [victim.name]


def test_a_subset_keeping_its_original_targets_is_renumbered_in_target_order(
        tmp_path: Path) -> None:
    rows = [("1-100-A-12.wav", 1, 12, "siren"), ("1-200-A-3.wav", 1, 3, "dog"),
            ("2-300-A-7.wav", 2, 7, "rain"), ("2-400-A-3.wav", 2, 3, "dog")]
    dataset = load_esc50(write_esc50(tmp_path / "subset", rows))
    assert dataset.class_names == ["dog", "rain", "siren"]  # targets 3, 7, 12 -> 0, 1, 2
    assert {c.filename: c.target for c in dataset.clips} == {
        "1-100-A-12.wav": 2, "1-200-A-3.wav": 0, "2-300-A-7.wav": 1, "2-400-A-3.wav": 0}
    assert [dataset.class_names[c.target] for c in dataset.clips] == [r[3] for r in rows]


def test_a_category_under_two_targets_is_refused(tmp_path: Path) -> None:
    rows = [("1-100-A-3.wav", 1, 3, "dog"), ("1-200-A-7.wav", 1, 7, "dog")]
    root = write_esc50(tmp_path / "twice", rows)
    with pytest.raises(DataError) as err:
        load_esc50(root)
    assert str(err.value) == (f"{root / 'meta' / 'esc50.csv'}: category 'dog' has targets [3, 7]; "
                              "give each category one target")


def cut(path: Path, frames: int) -> None:
    """Truncate a mono 16-bit WAV after ``frames`` samples, as an interrupted copy would (its
    header still states the full length)."""
    header = path.stat().st_size - 2 * sf.info(str(path)).frames
    path.write_bytes(path.read_bytes()[: header + 2 * frames])


def test_a_truncated_clip_is_a_warning_naming_it_or_under_strict_an_error(
        tiny_esc50: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """tiny_esc50's clips last 1 s at 44.1 kHz: one cut to 22050 frames (0.5 s) is short, one
    cut to 43880 frames (0.995 s, within the 10 ms tolerance) is not."""
    victim, nearly = sorted((tiny_esc50 / "audio").iterdir())[:2]
    cut(victim, 22050)
    cut(nearly, 43880)
    assert sf.info(str(victim)).frames == 22050
    assert load_esc50(tiny_esc50).short == {}  # no stated length: nothing to compare
    config = DatasetConfig(name=DatasetName.esc50, root=str(tiny_esc50), clip_seconds=1.0)
    with caplog.at_level(logging.WARNING, logger="flcore.data.esc50"):
        dataset = load_dataset(config, tmp_path)
    assert len(dataset.clips) == 30 and dataset.short == {victim.name: 0.5}
    assert (f"1 clip(s) of {tiny_esc50 / 'audio'} shorter than dataset.clip_seconds=1 "
            f"(truncated?), kept (dataset.strict=true refuses them): {victim.name} (0.500 s)"
            ) in caplog.messages
    config.strict = True
    with pytest.raises(DataError) as err:
        load_dataset(config, tmp_path)
    assert str(err.value) == (f"{victim}: 0.500 s, shorter than dataset.clip_seconds=1 "
                              "(truncated?); re-export or remove it, or set dataset.strict=false "
                              "to keep it with a warning")
    config.clip_seconds = 0.5
    assert load_dataset(config, tmp_path).short == {}
