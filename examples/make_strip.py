"""Render the example with the embedded default model and save a strip of its frames for the README.

    python examples/make_strip.py     # renders out/speech.mp4, writes examples/demo_strip.png
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from livetalk_cli.mp4 import read_video

HERE = Path(__file__).resolve().parent
FRAMES = (0, 6, 12, 18, 24, 30, 36, 42)


def main() -> None:
    out = HERE.parent / "out" / "speech.mp4"
    prompt = (HERE / "prompt.txt").read_text().strip()
    subprocess.run([sys.executable, "-m", "livetalk_cli", "render", str(HERE / "speech.wav"), "--image",
                    str(HERE / "face.png"), "--prompt", prompt, "--out", str(out), "--overwrite"], check=True)
    video = read_video(out)
    strip = np.concatenate([video[i] for i in FRAMES if i < len(video)], axis=1)
    Image.fromarray(strip).save(HERE / "demo_strip.png")
    logging.getLogger("make_strip").info("wrote demo_strip.png from %s (%d frames)", out, len(video))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
