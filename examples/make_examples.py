"""Make the project's own example assets, deterministically, from nothing but numpy and Pillow.

    python examples/make_examples.py            # writes examples/speech.wav and examples/face.png

- speech.wav: ~3.5 s of synthetic speech-like audio, 16 kHz mono 16-bit PCM. Source-filter
  synthesis: a harmonic source on a gliding pitch contour (110-220 Hz), shaped per vowel by three
  formant resonances, preceded by short filtered-noise consonant bursts, with a per-syllable
  amplitude envelope and silences between words.
- face.png: a 256x256 cartoon face drawn with Pillow (background, hair, head, ears, neck, eyes,
  brows, nose, mouth), supersampled for smooth edges.
"""

from __future__ import annotations

import argparse
import logging
import wave
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger("make_examples")

SAMPLE_RATE = 16000
HERE = Path(__file__).resolve().parent

# Vowel formants (F1, F2, F3) in Hz, roughly an adult speaker's.
VOWELS: dict[str, tuple[float, float, float]] = {
    "a": (730.0, 1090.0, 2440.0),
    "e": (530.0, 1840.0, 2480.0),
    "i": (300.0, 2250.0, 3000.0),
    "o": (570.0, 840.0, 2410.0),
    "u": (325.0, 870.0, 2250.0),
}
FORMANT_BANDWIDTHS = (90.0, 110.0, 170.0)
FORMANT_GAINS = (1.0, 0.6, 0.3)


def _formant_envelope(freqs: np.ndarray, formants: tuple[float, float, float]) -> np.ndarray:
    """Magnitude of a sum of resonances (Lorentzian peaks) evaluated at `freqs` (Hz)."""
    env = np.zeros_like(freqs)
    for f, bw, g in zip(formants, FORMANT_BANDWIDTHS, FORMANT_GAINS, strict=True):
        env += g / (1.0 + ((freqs - f) / (bw / 2)) ** 2)
    return env + 0.01  # a little energy between formants


def _syllable(rng: np.random.Generator, f0_start: float, f0_end: float, vowel: str) -> np.ndarray:
    """One consonant burst + voiced vowel; returns float64 samples."""
    sr = SAMPLE_RATE
    parts: list[np.ndarray] = []
    if rng.random() < 0.8:  # consonant: filtered noise burst (fricative or plosive)
        n = int(sr * rng.uniform(0.02, 0.06))
        noise = rng.standard_normal(n)
        spectrum = np.fft.rfft(noise)
        freqs = np.fft.rfftfreq(n, 1 / sr)
        centre = rng.uniform(2500, 6000)
        spectrum *= np.exp(-(((freqs - centre) / 1500.0) ** 2))
        burst = np.fft.irfft(spectrum, n)
        burst *= np.hanning(n) * 0.25 / (np.abs(burst).max() + 1e-9)
        parts += [burst, np.zeros(int(sr * 0.01))]

    n = int(sr * rng.uniform(0.13, 0.24))
    t = np.linspace(0.0, 1.0, n)
    f0 = f0_start + (f0_end - f0_start) * t + 3.0 * np.sin(2 * np.pi * 5.5 * t * n / sr)  # + vibrato
    phase = 2 * np.pi * np.cumsum(f0) / sr
    formants = VOWELS[vowel]
    voiced = np.zeros(n)
    for k in range(1, int(4000 / f0.min()) + 1):  # harmonics below 4 kHz
        freq_k = k * f0
        amp = _formant_envelope(freq_k, formants) / k**0.5  # source tilt * vocal-tract filter
        voiced += np.where(freq_k < 0.45 * sr, amp, 0.0) * np.sin(k * phase)
    attack, release = int(0.02 * sr), int(0.05 * sr)
    env = np.ones(n)
    env[:attack] = np.linspace(0.0, 1.0, attack)
    env[-release:] = np.linspace(1.0, 0.0, release)
    env *= 0.8 + 0.2 * np.sin(np.pi * t)  # louder in the middle
    voiced *= env / (np.abs(voiced).max() + 1e-9)
    parts.append(voiced * rng.uniform(0.6, 0.9))
    return np.concatenate(parts)


def make_speech(seed: int = 0, duration_s: float = 3.5) -> np.ndarray:
    """Speech-like waveform, float32 in [-1, 1], exactly `duration_s` long."""
    rng = np.random.default_rng(seed)
    sr = SAMPLE_RATE
    total = round(duration_s * sr)
    pieces: list[np.ndarray] = [np.zeros(int(0.15 * sr))]
    length = pieces[0].size
    while True:
        word: list[np.ndarray] = []
        n_syl = int(rng.integers(1, 4))
        # Pitch contour over the word: starts mid/high, falls (declination) with a local rise.
        f0_hi, f0_lo = rng.uniform(150, 220), rng.uniform(110, 150)
        knots = np.linspace(f0_hi, f0_lo, n_syl + 1) + rng.uniform(-15, 15, n_syl + 1)
        for s in range(n_syl):
            vowel = str(rng.choice(list(VOWELS)))
            word.append(_syllable(rng, float(knots[s]), float(knots[s + 1]), vowel))
            word.append(np.zeros(int(sr * rng.uniform(0.01, 0.04))))
        pause = np.zeros(int(sr * rng.uniform(0.08, 0.25)))
        word_len = sum(w.size for w in word) + pause.size
        if length + word_len > total - int(0.15 * sr):
            break
        pieces += word + [pause]
        length += word_len
    audio = np.concatenate(pieces)
    audio = np.pad(audio, (0, total - audio.size))
    audio *= 0.7 / np.abs(audio).max()
    return audio.astype(np.float32)


def write_wav(path: Path, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write mono float audio in [-1, 1] as 16-bit PCM WAV."""
    pcm = np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())


def make_face(size: int = 256, supersample: int = 4) -> Image.Image:
    """A cartoon face, drawn at `supersample`x and downsampled for anti-aliased edges."""
    s = size * supersample

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[int, int, int, int]:
        """Coordinates given on a 256-unit canvas, scaled to the drawing canvas."""
        k = s / 256
        return (round(x0 * k), round(y0 * k), round(x1 * k), round(y1 * k))

    def pt(x: float, y: float) -> tuple[int, int]:
        return (round(x * s / 256), round(y * s / 256))

    def w(width: float) -> int:
        return max(1, round(width * s / 256))

    skin, skin_dark = (241, 194, 160), (214, 160, 125)
    hair = (84, 52, 35)
    img = Image.new("RGB", (s, s), (120, 170, 210))
    d = ImageDraw.Draw(img)
    # Background: a soft lighter disc behind the head.
    d.ellipse(box(28, 18, 228, 218), fill=(150, 192, 226))
    # Shoulders and neck.
    d.chord(box(30, 212, 226, 330), 180, 360, fill=(70, 110, 160))
    d.rectangle(box(108, 180, 148, 225), fill=skin_dark)
    # Hair at the back, ears, head.
    d.ellipse(box(60, 38, 196, 170), fill=hair)
    d.ellipse(box(62, 106, 84, 140), fill=skin_dark)
    d.ellipse(box(172, 106, 194, 140), fill=skin_dark)
    d.ellipse(box(72, 52, 184, 204), fill=skin)
    # Fringe.
    d.chord(box(70, 40, 186, 122), 180, 360, fill=hair)
    d.polygon([pt(70, 81), pt(120, 81), pt(86, 104)], fill=hair)
    # Eyes: white, iris, pupil, highlight.
    for cx in (105, 151):
        d.ellipse(box(cx - 13, 112, cx + 13, 130), fill=(250, 250, 250), outline=(60, 40, 30), width=w(1.5))
        d.ellipse(box(cx - 7, 114, cx + 7, 128), fill=(70, 110, 60))
        d.ellipse(box(cx - 3.5, 117.5, cx + 3.5, 124.5), fill=(15, 15, 15))
        d.ellipse(box(cx + 1, 116, cx + 4, 119), fill=(255, 255, 255))
        d.arc(box(cx - 15, 98, cx + 15, 112), 200, 340, fill=hair, width=w(3.5))  # brow
    # Nose.
    d.line([pt(128, 128), pt(122, 152), pt(131, 154)], fill=skin_dark, width=w(2.5), joint="curve")
    # Cheeks.
    for cx in (96, 160):
        d.ellipse(box(cx - 10, 144, cx + 10, 156), fill=(240, 170, 150))
    # Mouth: slightly open, lips and teeth.
    d.chord(box(108, 162, 148, 184), 0, 180, fill=(150, 50, 60))
    d.chord(box(114, 162, 142, 170), 0, 180, fill=(245, 245, 240))
    d.arc(box(108, 158, 148, 186), 10, 170, fill=(170, 80, 85), width=w(2))
    return img.resize((size, size), Image.Resampling.LANCZOS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=HERE)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    speech = make_speech(seed=args.seed)
    write_wav(args.out_dir / "speech.wav", speech)
    logger.info("wrote %s (%.2f s)", args.out_dir / "speech.wav", speech.size / SAMPLE_RATE)
    make_face().save(args.out_dir / "face.png", optimize=True)
    logger.info("wrote %s", args.out_dir / "face.png")


if __name__ == "__main__":
    main()
