"""The bundled synthetic dataset: ten sound classes in the ESC-50 layout.

Every clip is drawn from its own seeded generator, so the same seed gives byte-identical files in
any order. Each class has per-clip variation in pitch, timing, loudness and background noise. The
default set is made hard on purpose (docs/experiments.md, "The bundled benchmark"): clips come in
source recordings whose clips share a room (reverberation and a microphone EQ) and a background
sound from another class, so a test fold of unseen recordings separates methods by more than a
few clips. ``dataset=synthetic_small`` keeps the easy set (one recording per clip, no room, no
background) for quick tests.
"""

import csv
import logging
import os
import shutil
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import soundfile as sf
from tqdm import tqdm

from flcore.config import SyntheticConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
META_COLUMNS = ("filename", "fold", "target", "category", "esc10", "src_file", "take")

Synth = Callable[[np.random.Generator, np.ndarray, int], np.ndarray]


def _event(rng: np.random.Generator, t: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """A random (start, length) in seconds for an event of ``low``..``high`` s inside the clip."""
    length = min(rng.uniform(low, high), 0.8 * t[-1])
    return rng.uniform(0, t[-1] - length), length


def _sweep(rng: np.random.Generator, t: np.ndarray, sr: int, rising: bool) -> np.ndarray:
    """Exponential frequency sweeps, repeated one to three times."""
    out = np.zeros_like(t)
    f_lo = rng.uniform(250, 600)
    f_hi = f_lo * rng.uniform(3.0, 5.0)
    for _ in range(rng.integers(1, 4)):
        start, length = _event(rng, t, 0.4, 1.4)
        mask = (t >= start) & (t < start + length)
        u = (t[mask] - start) / length
        f0, f1 = (f_lo, f_hi) if rising else (f_hi, f_lo)
        k = np.log(f1 / f0)
        phase = 2 * np.pi * f0 * length * (np.exp(k * u) - 1) / k
        out[mask] += np.sin(phase) * np.hanning(mask.sum())
    return out


def _rising_chirp(rng: np.random.Generator, t: np.ndarray, sr: int) -> np.ndarray:
    return _sweep(rng, t, sr, rising=True)


def _falling_chirp(rng: np.random.Generator, t: np.ndarray, sr: int) -> np.ndarray:
    return _sweep(rng, t, sr, rising=False)


def _engine_hum(rng: np.random.Generator, t: np.ndarray, sr: int) -> np.ndarray:
    """A low harmonic drone whose loudness pulses at the firing rate."""
    f0 = rng.uniform(35, 70)
    harmonics = sum(np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 2 * np.pi)) / h
                    for h in range(1, 8))
    firing = 1 + 0.4 * np.sin(2 * np.pi * rng.uniform(8, 20) * t)
    return harmonics * firing


def _rain(rng: np.random.Generator, t: np.ndarray, sr: int) -> np.ndarray:
    """High-passed noise with dense random droplet impulses."""
    hiss = np.diff(rng.standard_normal(len(t) + 1))
    drops = np.zeros_like(t)
    idx = rng.integers(0, len(t), size=int(rng.uniform(150, 400) * t[-1]))
    drops[idx] = rng.uniform(0.5, 2.0, size=len(idx))
    kernel = np.exp(-np.arange(int(0.004 * sr)) / (0.0008 * sr))
    return 0.5 * hiss + np.convolve(drops, kernel, mode="same") * rng.choice([-1, 1], len(t))


def _click_train(rng: np.random.Generator, t: np.ndarray, sr: int) -> np.ndarray:
    """Bursts of periodic sharp clicks."""
    out = np.zeros_like(t)
    rate = rng.uniform(6, 20)
    for _ in range(rng.integers(1, 4)):
        start, length = _event(rng, t, 0.6, 1.8)
        for onset in np.arange(start, min(start + length, t[-1]), 1 / rate):
            i = int(onset * sr)
            out[i : i + 40] += np.exp(-np.arange(len(out[i : i + 40])) / 6.0)
    return np.diff(out, prepend=0.0) * 4


def _whistle(rng: np.random.Generator, t: np.ndarray, sr: int) -> np.ndarray:
    """A steady high tone with slight vibrato, held for part of the clip."""
    f = rng.uniform(2000, 3500)
    vibrato = rng.uniform(5, 30) * np.sin(2 * np.pi * rng.uniform(4, 7) * t)
    start, length = _event(rng, t, 1.5, 3.0)
    envelope = np.clip(np.minimum(t - start, start + length - t) * 20, 0, 1)
    return np.sin(2 * np.pi * np.cumsum(f + vibrato) / sr) * envelope


def _siren(rng: np.random.Generator, t: np.ndarray, sr: int) -> np.ndarray:
    """A tone slowly wailing up and down between two pitches."""
    lo, hi = rng.uniform(500, 800), rng.uniform(1200, 1700)
    f = lo + (hi - lo) * 0.5 * (1 + np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t
                                            + rng.uniform(0, 2 * np.pi)))
    phase = 2 * np.pi * np.cumsum(f) / sr
    return np.sin(phase) + 0.3 * np.sin(2 * phase)


def _bell(rng: np.random.Generator, t: np.ndarray, sr: int) -> np.ndarray:
    """Struck inharmonic partials with exponential decay."""
    out = np.zeros_like(t)
    f0 = rng.uniform(400, 900)
    for _ in range(rng.integers(1, 4)):
        i = int(_event(rng, t, 1.5, 1.5)[0] * sr)
        u = t[: len(t) - i]
        decay = rng.uniform(2, 4)
        for ratio, amp in ((1.0, 1.0), (2.76, 0.6), (5.40, 0.4), (8.93, 0.25)):
            out[i:] += amp * np.exp(-u * decay * ratio**0.5) * np.sin(2 * np.pi * f0 * ratio * u)
    return out


def _heartbeat(rng: np.random.Generator, t: np.ndarray, sr: int) -> np.ndarray:
    """Low lub-dub thumps at a resting heart rate."""
    out = np.zeros_like(t)
    period = 60 / rng.uniform(55, 100)
    u = t[: int(0.3 * sr)]
    thump = np.exp(-u * 25) * np.sin(2 * np.pi * rng.uniform(45, 80) * u)
    for beat in np.arange(rng.uniform(0, period), t[-1], period):
        for offset, amp in ((0.0, 1.0), (0.28 * period, 0.7)):
            i = int((beat + offset) * sr)
            segment = out[i : i + len(thump)]
            segment += amp * thump[: len(segment)]
    return out


def _buzz(rng: np.random.Generator, t: np.ndarray, sr: int) -> np.ndarray:
    """A sawtooth buzz with wandering pitch and fluttering loudness."""
    f = rng.uniform(150, 320) * (1 + 0.03 * np.sin(2 * np.pi * rng.uniform(0.3, 1.5) * t))
    phase = np.cumsum(f) / sr
    saw = 2 * (phase - np.floor(phase + 0.5))
    flutter = 0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(2, 6) * t + rng.uniform(0, 6))
    return saw * flutter


CLASSES: dict[str, Synth] = {
    "rising_chirp": _rising_chirp,
    "falling_chirp": _falling_chirp,
    "low_engine_hum": _engine_hum,
    "rain_like_noise": _rain,
    "click_train": _click_train,
    "high_whistle": _whistle,
    "siren_wail": _siren,
    "bell_ring": _bell,
    "heartbeat_thump": _heartbeat,
    "buzzing_insect": _buzz,
}


def _pink_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    spectrum /= np.sqrt(np.maximum(np.arange(len(spectrum)), 1))
    return np.fft.irfft(spectrum, n)


def _unit_rms(x: np.ndarray) -> np.ndarray:
    """``x`` scaled to unit RMS, so that levels in dB are relative to it."""
    return x / (np.sqrt(np.mean(x**2)) + 1e-12)


def source_of(clip: int, config: SyntheticConfig) -> tuple[int, str]:
    """The index of a clip's source recording within its class, and its take letter (A, B, ...)."""
    return clip // config.clips_per_source, chr(ord("A") + clip % config.clips_per_source)


def fold_of(source: int, config: SyntheticConfig) -> int:
    """A recording's fold: recordings are dealt to folds cyclically in proportion to
    ``fold_weights``, so every clip of a recording lands in one fold."""
    pattern = [f for f, w in enumerate(config.fold_weights, start=1) for _ in range(w)]
    return pattern[source % len(pattern)]


def _source_rng(target: int, source: int, config: SyntheticConfig) -> np.random.Generator:
    """The generator of what a recording's clips share (background class, then room and EQ)."""
    return np.random.default_rng([config.seed, target, source, 1])


def _room_filter(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """The rfft response (over ``2 n`` points) of a random room and microphone EQ.

    The room is a direct path plus exponentially decaying noise (RT60 0.1-0.8 s, wet level
    -12..0 dB); the EQ is a smooth curve through random gains of +-12 dB at 8 log-spaced
    frequencies.
    """
    rt60 = rng.uniform(0.1, 0.8)
    length = min(int(rt60 * sr), n)
    tail = rng.standard_normal(length) * np.exp(-6.9 * np.arange(length) / (rt60 * sr))
    response = np.zeros(2 * n)
    response[0] = 1.0
    response[1 : length + 1] = _unit_rms(tail) * 10 ** (rng.uniform(-12, 0) / 20) / np.sqrt(
        0.1 * sr)
    freqs = np.fft.rfftfreq(2 * n, 1 / sr)
    knots = np.geomspace(60, sr / 2, 8)
    gains_db = rng.uniform(-12, 12, size=len(knots))
    eq = 10 ** (np.interp(np.log(np.maximum(freqs, 1.0)), np.log(knots), gains_db) / 20)
    return np.fft.rfft(response) * eq


def _background(target: int, clip: int, config: SyntheticConfig, t: np.ndarray,
                sr: int) -> np.ndarray:
    """A sound of another class under the clip, at ``background_db`` relative to it; the class
    is the recording's, the event and level the clip's."""
    other = int(_source_rng(target, source_of(clip, config)[0], config).integers(len(CLASSES) - 1))
    other += other >= target
    rng = np.random.default_rng([config.seed, target, clip, 2])
    sound = _unit_rms(list(CLASSES.values())[other](rng, t, sr))
    return sound * 10 ** (rng.uniform(*config.background_db) / 20)


@lru_cache(maxsize=4)
def _recording_room(seed: int, target: int, source: int, n: int, sr: int) -> np.ndarray:
    """A recording's room filter, drawn once for all its takes (clips are written in order)."""
    rng = np.random.default_rng([seed, target, source, 1])
    rng.integers(len(CLASSES) - 1)  # the background class, drawn first by _background
    return _room_filter(rng, n, sr)


def _in_room(signal: np.ndarray, target: int, clip: int, config: SyntheticConfig) -> np.ndarray:
    """``signal`` as the recording's room and microphone colour it (linear convolution)."""
    n = len(signal)
    room = _recording_room(config.seed, target, source_of(clip, config)[0], n,
                           config.sample_rate)
    return np.fft.irfft(np.fft.rfft(signal, 2 * n) * room)[:n]


def synthesize_clip(target: int, clip: int, config: SyntheticConfig) -> np.ndarray:
    """One clip of class ``target`` as float32 in [-1, 1], determined by (seed, target, clip)."""
    rng = np.random.default_rng([config.seed, target, clip])
    sr = config.sample_rate
    t = np.arange(round(config.duration_s * sr)) / sr
    signal = list(CLASSES.values())[target](rng, t, sr)
    if config.background_db:
        signal = _unit_rms(signal) + _background(target, clip, config, t, sr)
    if config.room:
        signal = _in_room(signal, target, clip, config)
    signal = _unit_rms(signal)
    noise = _pink_noise(rng, len(t)) if rng.random() < 0.5 else rng.standard_normal(len(t))
    snr_db = rng.uniform(*config.snr_db)
    mix = signal + _unit_rms(noise) * 10 ** (-snr_db / 20)
    peak_db = rng.uniform(-18, -3)
    mix *= 10 ** (peak_db / 20) / np.max(np.abs(mix))
    return mix.astype(np.float32)


def clip_filename(fold: int, src_file: str, take: str, target: int) -> str:
    """ESC-50's file naming: ``{fold}-{src_file}-{take}-{target}.wav``."""
    return f"{fold}-{src_file}-{take}-{target}.wav"


class ClipRow(NamedTuple):
    """One clip's metadata: what to synthesize and its ``meta/esc50.csv`` fields."""

    target: int
    clip: int
    filename: str
    fold: int
    src_file: str
    take: str


def clip_rows(config: SyntheticConfig) -> list[ClipRow]:
    """Every clip's metadata, class by class: a recording's takes are consecutive clips."""
    rows = []
    for target in range(len(CLASSES)):
        for clip in range(config.clips_per_class):
            source, take = source_of(clip, config)
            fold = fold_of(source, config)
            src_file = f"{target + 1:02d}{source:04d}"
            rows.append(ClipRow(target, clip, clip_filename(fold, src_file, take, target), fold,
                                src_file, take))
    return rows


def write_dataset(root: Path, config: SyntheticConfig, progress: bool = True) -> Path:
    """Write the dataset in ESC-50 layout (``audio/``, ``meta/esc50.csv``) under ``root``."""
    audio_dir = root / "audio"
    (root / "meta").mkdir(parents=True, exist_ok=True)
    audio_dir.mkdir(parents=True, exist_ok=True)
    names = list(CLASSES)
    rows = clip_rows(config)
    for row in tqdm(rows, desc="synthetic dataset", unit="clip",
                    disable=None if progress else True):
        audio = synthesize_clip(row.target, row.clip, config)
        sf.write(audio_dir / row.filename, audio, config.sample_rate, subtype="PCM_16",
                 format="WAV")
    with open(root / "meta" / "esc50.csv", "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(META_COLUMNS)
        writer.writerows(sorted((r.filename, r.fold, r.target, names[r.target], "False",
                                 r.src_file, r.take) for r in rows))
    return root


def dataset_dirname(config: SyntheticConfig) -> str:
    """Cache folder name: every parameter that changes the files is in it."""
    folds = ".".join(str(w) for w in config.fold_weights)
    background = ("bg{:g}to{:g}dB".format(*config.background_db) if config.background_db
                  else "nobg")
    return (f"v{FORMAT_VERSION}-seed{config.seed}-{config.clips_per_class}clips-"
            f"{config.clips_per_source}perrec-folds{folds}-{config.duration_s:g}s-"
            f"{config.sample_rate}Hz-snr{config.snr_db[0]:g}to{config.snr_db[1]:g}dB-"
            f"{background}-{'room' if config.room else 'dry'}")


def ensure_dataset(cache_dir: Path, config: SyntheticConfig) -> Path:
    """The cached dataset folder, generated atomically (temp folder + rename) if absent."""
    root = Path(cache_dir) / "synthetic" / dataset_dirname(config)
    if (root / "meta" / "esc50.csv").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    log.info("Generating the bundled synthetic dataset into %s", root)
    write_dataset(staging, config)
    try:
        os.rename(staging, root)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (root / "meta" / "esc50.csv").is_file():
            raise
    return root
