"""The synthetic world: procedural talking heads whose truth is known, and metrics on any video.

- `speech`: speech-like audio (syllables, words, pauses) from random speakers.
- `face`: identities, text-controllable attributes, and a vectorised rasteriser.
- `clip`: deterministic clips (frames, audio, reference image, prompt, ground-truth mouth).
- `metrics`: lip-sync, identity error, temporal stability and drift on any frames + audio.
- `evaluate`: the same metrics over MP4 files (`livetalk eval`).
"""
