"""Speech-like audio for the synthetic world: syllables, words, phrases and silences, in numpy.

A speaker has a base pitch (80-300 Hz), a vocal-tract length (formant scale), breathiness and a
speaking rate. An utterance is a sequence of phrases separated by pauses (and now and then a long
silence of exact zeros); a phrase is words separated by short gaps; a word is 1-3 syllables.
A syllable is an optional consonant (fricative hiss, plosive closure + burst, or nasal murmur)
followed by a voiced vowel:

- source: a band-limited sawtooth (polyBLEP) following a pitch contour (phrase declination, a
  per-syllable accent and a small wiggle) plus aspiration noise;
- vocal tract: a parallel bank of five resonances (F1-F3 of the vowel, F4 and F5 per speaker)
  with falling gains, applied as a magnitude response by FFT-domain filtering; a diphthong glides
  by cross-fading the outputs of the filters for its start and end vowels;
- amplitude: raised-cosine attack and release, a per-syllable stress gain.

Everything per segment is vectorised (a few FFTs per syllable), so 10 s take a few tens of ms.
"""

from __future__ import annotations

import numpy as np

# Vowel targets (F1, F2, F3) in Hz for an average adult vocal tract.
VOWELS: dict[str, tuple[float, float, float]] = {
    "i": (290.0, 2250.0, 2950.0),
    "ih": (400.0, 1950.0, 2550.0),
    "e": (470.0, 2100.0, 2700.0),
    "eh": (580.0, 1800.0, 2550.0),
    "ae": (690.0, 1680.0, 2420.0),
    "a": (760.0, 1220.0, 2520.0),
    "aw": (600.0, 950.0, 2450.0),
    "o": (480.0, 880.0, 2380.0),
    "uh": (460.0, 1080.0, 2350.0),
    "u": (320.0, 830.0, 2280.0),
    "er": (490.0, 1360.0, 1720.0),
}
_VOWEL_NAMES = tuple(VOWELS)
_PITCH_MIN, _PITCH_MAX = 80.0, 300.0
# Formant bandwidths (Hz) and linear gains of F1..F5 in the parallel vocal-tract model.
_BANDWIDTHS = (70.0, 100.0, 140.0, 220.0, 300.0)
_GAINS = (1.0, 0.9, 0.6, 0.4, 0.25)


def synth_speech(rng: np.random.Generator, num_samples: int, sample_rate: int = 16000) -> np.ndarray:
    """Synthesise `num_samples` of speech-like audio from one random speaker.

    Returns float32 mono in [-1, 1], shape (num_samples,). Pauses between phrases are exact zeros.
    The active level is normalised to about -20 dBFS RMS (+-3 dB per clip).
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if sample_rate < 8000:
        raise ValueError(f"sample_rate must be >= 8000, got {sample_rate}")
    out = np.zeros(num_samples, np.float64)
    if num_samples == 0:
        return out.astype(np.float32)
    spk = _Speaker.sample(rng)
    pos = int(rng.uniform(0.0, 0.4) * sample_rate)
    while pos < num_samples:
        pos = _phrase(rng, spk, out, pos, sample_rate)
        if rng.random() < 0.1:
            pos += int(rng.uniform(1.0, 2.5) * sample_rate)  # a long silence
        else:
            pos += int(rng.uniform(0.2, 0.6) * sample_rate)
    active = np.abs(out) > 1e-6
    if active.any():
        rms = float(np.sqrt(np.mean(out[active] ** 2)))
        target = 10.0 ** ((-20.0 + rng.uniform(-3.0, 3.0)) / 20.0)
        out *= target / max(rms, 1e-12)
        peak = float(np.abs(out).max())
        if peak > 0.97:
            out *= 0.97 / peak
    return out.astype(np.float32)


class _Speaker:
    """Per-utterance voice parameters."""

    def __init__(self, pitch: float, formant_scale: float, breath: float, rate: float, f4: float) -> None:
        self.pitch = pitch  # base f0 in Hz
        self.formant_scale = formant_scale  # shorter vocal tract -> higher formants
        self.breath = breath  # aspiration noise relative to the voiced source
        self.rate = rate  # > 1 speaks faster (shorter syllables)
        self.f4 = f4

    @classmethod
    def sample(cls, rng: np.random.Generator) -> _Speaker:
        pitch = float(np.exp(rng.uniform(np.log(95.0), np.log(240.0))))
        # Higher voices tend to have shorter vocal tracts; keep some independent spread.
        scale = float(np.clip(0.9 + 0.25 * (pitch - 95.0) / 145.0 + rng.normal(0.0, 0.04), 0.85, 1.2))
        return cls(pitch, scale, float(rng.uniform(0.01, 0.06)), float(rng.uniform(0.8, 1.25)),
                   float(rng.uniform(3300.0, 3900.0)))


def _phrase(rng: np.random.Generator, spk: _Speaker, out: np.ndarray, pos: int, sr: int) -> int:
    """Write one phrase starting at `pos`; returns the position after its last syllable."""
    n_words = int(rng.integers(1, 7))
    declination = rng.uniform(0.75, 0.95)  # f0 at the end of the phrase relative to the start
    start_f0 = spk.pitch * rng.uniform(1.0, 1.2)
    n_syl_total = 0
    words = [int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15])) for _ in range(n_words)]
    total = max(sum(words), 1)
    for w, n_syl in enumerate(words):
        for _ in range(n_syl):
            frac = n_syl_total / total
            f0 = start_f0 * (1.0 + (declination - 1.0) * frac)
            pos = _syllable(rng, spk, out, pos, sr, f0)
            n_syl_total += 1
            pos += int(rng.uniform(0.0, 0.02) * sr)
            if pos >= out.size:
                return pos
        if w < n_words - 1:
            pos += int(rng.uniform(0.03, 0.18) * sr) if rng.random() < 0.8 else 0
    return pos


def _place(out: np.ndarray, pos: int, seg: np.ndarray) -> None:
    end = min(out.size, pos + seg.size)
    if end > pos:
        out[pos:end] += seg[: end - pos]


def _syllable(rng: np.random.Generator, spk: _Speaker, out: np.ndarray, pos: int, sr: int, f0: float) -> int:
    vowel_s = rng.uniform(0.06, 0.24) / spk.rate
    kind = rng.choice(["none", "fricative", "plosive", "nasal"], p=[0.2, 0.35, 0.3, 0.15])
    v0 = VOWELS[_VOWEL_NAMES[int(rng.integers(len(_VOWEL_NAMES)))]]
    v1 = v0 if rng.random() < 0.6 else VOWELS[_VOWEL_NAMES[int(rng.integers(len(_VOWEL_NAMES)))]]
    if kind == "fricative":
        seg = _fricative(rng, int(rng.uniform(0.04, 0.11) / spk.rate * sr), sr)
        _place(out, pos, seg)
        pos += seg.size - int(0.01 * sr)
    elif kind == "plosive":
        pos += int(rng.uniform(0.02, 0.06) * sr)  # closure: silence
        seg = _burst(rng, int(rng.uniform(0.01, 0.03) * sr), sr)
        _place(out, pos, seg)
        pos += seg.size
    elif kind == "nasal":
        n = int(rng.uniform(0.04, 0.08) / spk.rate * sr)
        nasal = (250.0, 1100.0, 2300.0)
        seg = 0.3 * _voiced(rng, spk, n, sr, f0, f0, nasal, nasal, attack_s=0.01, release_s=0.01)
        _place(out, pos, seg)
        pos += seg.size
    accent = rng.uniform(-0.05, 0.25)
    f_start = f0 * (1.0 + accent)
    f_end = f0 * (1.0 + accent * rng.uniform(-0.5, 0.6))
    stress = rng.uniform(0.55, 1.2)
    seg = stress * _voiced(rng, spk, int(vowel_s * sr), sr, f_start, f_end, v0, v1,
                           attack_s=rng.uniform(0.012, 0.03), release_s=rng.uniform(0.03, 0.07))
    _place(out, pos, seg)
    return pos + seg.size


def _raised_cosine_envelope(n: int, attack: int, release: int) -> np.ndarray:
    env = np.ones(n)
    attack, release = min(attack, n // 2), min(release, n // 2)
    if attack > 0:
        env[:attack] = 0.5 - 0.5 * np.cos(np.pi * (np.arange(attack) + 0.5) / attack)
    if release > 0:
        env[n - release:] = 0.5 + 0.5 * np.cos(np.pi * (np.arange(release) + 0.5) / release)
    return env


def _formant_envelope(freqs: np.ndarray, formants: tuple[float, ...]) -> np.ndarray:
    """Parallel formant magnitude response: sum_i A_i / sqrt(1 + ((f^2 - F_i^2) / (B_i f))^2).

    Each resonance peaks at 1 on its own formant; the gains A_i fall with the formant index and
    the sawtooth source supplies the -6 dB/octave tilt, so F2 of 'ee' sits ~25 dB under F1 and the
    spectrum keeps energy up to 6-8 kHz, as in recorded speech.
    """
    h = np.zeros_like(freqs)
    f = np.maximum(freqs, 1.0)
    for f_c, bw, gain in zip(formants, _BANDWIDTHS, _GAINS, strict=False):
        h += gain / np.sqrt(1.0 + ((f * f - f_c * f_c) / (bw * f)) ** 2)
    return h


def _voiced(
    rng: np.random.Generator,
    spk: _Speaker,
    n: int,
    sr: int,
    f_start: float,
    f_end: float,
    v0: tuple[float, float, float],
    v1: tuple[float, float, float],
    attack_s: float,
    release_s: float,
) -> np.ndarray:
    """A voiced segment of n samples gliding from vowel v0 to v1 and from pitch f_start to f_end."""
    if n <= 0:
        return np.zeros(0)
    r = np.arange(n) / max(n - 1, 1)
    wiggle = 1.0 + 0.015 * np.sin(2 * np.pi * (rng.uniform(3.0, 7.0) * r * n / sr) + rng.uniform(0, 2 * np.pi))
    f0 = np.clip((f_start + (f_end - f_start) * r) * wiggle, _PITCH_MIN, _PITCH_MAX)
    dt = f0 / sr
    phase = (rng.random() + np.cumsum(dt)) % 1.0
    saw = 2.0 * phase - 1.0
    # polyBLEP: smooth the ramp's drop so the source is close to band-limited.
    lo = phase < dt
    hi = phase > 1.0 - dt
    x = np.where(lo, phase / dt, 0.0)
    saw -= np.where(lo, 2 * x - x * x - 1.0, 0.0)
    y = np.where(hi, (phase - 1.0) / dt, 0.0)
    saw -= np.where(hi, y * y + 2 * y + 1.0, 0.0)
    source = -saw + spk.breath * 3.0 * rng.standard_normal(n)

    pad = 512
    nfft = n + pad
    freqs = np.fft.rfftfreq(nfft, 1.0 / sr)
    spec = np.fft.rfft(source, nfft)
    outs = []
    for v in (v0, v1) if v1 != v0 else (v0,):
        formants = tuple(f * spk.formant_scale for f in (*v, spk.f4, spk.f4 + 1100.0))
        h = _formant_envelope(freqs, formants)
        outs.append(np.fft.irfft(spec * h, nfft)[:n])
    y_out = outs[0] if len(outs) == 1 else outs[0] * (1.0 - r) + outs[1] * r
    y_out *= _raised_cosine_envelope(n, int(attack_s * sr), int(release_s * sr))
    rms = float(np.sqrt(np.mean(y_out**2))) + 1e-12
    return y_out / rms * 0.1


def _noise_band(rng: np.random.Generator, n: int, sr: int, lo: float, hi: float, tilt: float) -> np.ndarray:
    """White noise shaped by a soft band-pass [lo, hi] Hz with a spectral tilt (dB/octave above lo)."""
    nfft = n + 256
    freqs = np.fft.rfftfreq(nfft, 1.0 / sr)
    spec = np.fft.rfft(rng.standard_normal(n), nfft)
    band = 1.0 / (1.0 + (lo / np.maximum(freqs, 1.0)) ** 4) / (1.0 + (freqs / hi) ** 6)
    band *= (np.maximum(freqs, lo) / lo) ** (tilt / 6.0)
    y = np.fft.irfft(spec * band, nfft)[:n]
    return y / (float(np.sqrt(np.mean(y**2))) + 1e-12)


def _fricative(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """Hiss: 's' (high band), 'sh' (mid-high), 'f'/'h' (broad, weak)."""
    if n <= 0:
        return np.zeros(0)
    nyq = sr / 2
    kind = int(rng.integers(3))
    lo, hi, level = [(3800.0, 0.95 * nyq, 0.35), (2000.0, 5000.0, 0.3), (600.0, 0.9 * nyq, 0.12)][kind]
    y = _noise_band(rng, n, sr, lo, hi, tilt=0.0) * level * 0.1 * rng.uniform(0.7, 1.3)
    return y * _raised_cosine_envelope(n, int(0.015 * sr), int(0.02 * sr))


def _burst(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """A plosive release: a short broadband transient with a fast decay."""
    if n <= 0:
        return np.zeros(0)
    lo = float(rng.choice([500.0, 1500.0, 3000.0]))
    y = _noise_band(rng, n, sr, lo, 0.9 * sr / 2, tilt=-3.0)
    decay = np.exp(-np.arange(n) / (0.3 * n))
    return y * decay * 0.1 * rng.uniform(0.4, 0.8)
