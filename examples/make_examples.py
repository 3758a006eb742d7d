"""Make the example assets from the project's synthetic world (deterministic).

    python examples/make_examples.py       # writes examples/speech.wav, face.png, prompt.txt

A held-out world clip (seed 2,000,000: outside the training and evaluation seeds of recipes/demo):
- speech.wav: 5 s of the world's speech-like audio, 16 kHz mono 16-bit PCM;
- face.png: the identity's reference portrait (96x96, the demo model's resolution);
- prompt.txt: the clip's text attributes as a prompt.
"""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image

from livetalk_cli.media import write_wav
from livetalk_cli.world.clip import WorldConfig, make_clip

HERE = Path(__file__).resolve().parent
SEED = 2_000_000
SECONDS = 5


def main() -> None:
    cfg = WorldConfig()
    clip = make_clip(SEED, SECONDS * cfg.fps, cfg)
    write_wav(HERE / "speech.wav", clip.audio, cfg.sample_rate)
    Image.fromarray(clip.reference).save(HERE / "face.png")
    (HERE / "prompt.txt").write_text(clip.prompt + "\n")
    logging.getLogger("make_examples").info("wrote speech.wav, face.png, prompt.txt (%s)", clip.prompt)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
