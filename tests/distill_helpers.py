"""The tiny distillation recipe the distill tests share (its run folder, `tiny_run`, and the
`one_thread` fixture are in conftest.py)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import yaml

# Every stage in ~10 s on one CPU thread: 4 clips of 21 frames (6 latent frames = 2 blocks).
TINY = """\
name: tiny-test
model: tiny
seed: 0
device: cpu
world: {train_clips: 4, clip_frames: 21}
vae: {steps: 2, batch_size: 2, clip_frames: 5, stats_clips: 2, log_every: 1}
decoder: {steps: 2, batch_size: 2, clip_frames: 5, eval_clips: 1, log_every: 1}
teacher: {steps: 2, batch_size: 2, log_every: 1, mouth_weight: 5.0}
trajectories: {num_samples: 2, num_steps: 4, keep_steps: [0, 1, 2, 3, 4], shard_size: 2, batch_size: 2}
ode_init: {steps: 2, batch_size: 2, log_every: 1, plateau_window: 1}
dmd: {steps: 3, batch_size: 2, num_blocks: 2, critic_warmup: 1, critic_per_gen: 2, ema_start: 1, log_every: 1}
"""

def tiny_data(**sections: dict) -> dict:
    """The tiny recipe as data, with `sections` merged into its stage sections."""
    data = yaml.safe_load(TINY)
    for name, changes in sections.items():
        data[name] = {**data.get(name, {}), **changes}
    return data


def write_recipe(path: Path, **sections: dict) -> Path:
    path.write_text(yaml.safe_dump(tiny_data(**sections)))
    return path


def set_key(data: dict, key: str, value: object) -> dict:
    """data with the dotted `key` set (intermediate mappings created)."""
    data = copy.deepcopy(data)
    *parents, last = key.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return data


def seed_run_folder(src: Path, dst: Path, *parts: str) -> Path:
    """A run folder holding copies of earlier stages' outputs (to start a later stage directly)."""
    dst.mkdir(parents=True)
    for p in parts:
        shutil.copytree(src / p, dst / p)
    return dst
