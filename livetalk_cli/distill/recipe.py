"""Distillation recipes: YAML files validated into typed configs, in this one place.

A recipe names a model (a preset, optionally with overrides), where its data comes from, and the
stages to run in order. Every stage has its own typed section; unknown keys, wrong types and bad
values are one clear `UserError` naming the key.

    name: demo
    model: demo
    out: runs/demo
    stages: [vae, teacher, trajectories, ode_init, dmd]
    teacher: {steps: 3000, batch_size: 8, optim: {lr: 3.0e-4}}
    ...
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from livetalk_cli.config import ModelConfig, preset
from livetalk_cli.errors import UserError
from livetalk_cli.sampling.schedule import sampling_sigmas

STAGES = ("vae", "decoder", "teacher", "trajectories", "ode_init", "dmd")
TRAINING_STAGES = ("vae", "decoder", "teacher", "ode_init", "dmd")


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimConfig:
    """AdamW and its schedule. `aggressive`: lr x `boost` for the first `boost_steps`, then lr
    (LiveTalk trains DMD at twice Self Forcing's rate inside the short window where it helps)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "aggressive"] = "constant"
    boost: float = 2.0
    boost_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine floor

    def validate(self, where: str) -> None:
        _check(self.lr > 0, f"{where}.lr must be > 0")
        _check(all(0 <= b < 1 for b in self.betas), f"{where}.betas must be in [0, 1)")
        _check(self.grad_clip >= 0 and self.weight_decay >= 0, f"{where}: grad_clip, weight_decay >= 0")
        _check(self.warmup_steps >= 0 and self.boost_steps >= 0, f"{where}: step counts must be >= 0")
        _check(self.boost > 0 and 0 <= self.min_lr_ratio <= 1, f"{where}: boost > 0, min_lr_ratio in [0, 1]")


@dataclass(frozen=True, kw_only=True, slots=True)
class LoopConfig:
    """What every training stage shares: length, batch, accumulation, checkpoint and log cadence."""

    steps: int = 1000
    batch_size: int = 8  # global batch per optimiser step (split over ranks and micro-batches)
    grad_accum: int = 1  # micro-batches per optimiser step on each rank
    ckpt_every: int = 100
    log_every: int = 10

    def validate_loop(self, where: str) -> None:
        _check(self.steps >= 0, f"{where}.steps must be >= 0")
        _check(self.batch_size >= 1 and self.grad_accum >= 1, f"{where}: batch_size, grad_accum >= 1")
        _check(self.batch_size % self.grad_accum == 0, f"{where}.batch_size must be divisible by grad_accum")
        _check(self.ckpt_every >= 1 and self.log_every >= 1, f"{where}: ckpt_every, log_every >= 1")


@dataclass(frozen=True, kw_only=True, slots=True)
class WorldDataConfig:
    """Training data from the synthetic world: clip seeds [0, train_clips) for training,
    [heldout_seed, heldout_seed + n) for evaluation. Frame 0 of every clip is the reference image."""

    train_clips: int = 1024
    clip_frames: int = 45  # 1 + 4k video frames = 1 + k latent frames
    heldout_seed: int = 1_000_000
    latents: str | None = None  # a folder of latent shards (data.py format) instead of world clips
    latent_clips: int = 0  # the DiT stages use (and the vae stage encodes) clips [0, this); 0 = train_clips

    @property
    def num_latent_clips(self) -> int:
        return self.latent_clips or self.train_clips


@dataclass(frozen=True, kw_only=True, slots=True)
class VAEStage(LoopConfig):
    clip_frames: int = 17
    long_clip_frames: int = 0  # from step `long_clip_from` train on clips this long (0 = never): a causal
    long_clip_from: int = 0  # VAE must see streams longer than its temporal receptive field
    crop: int = 0  # train on random square crops of this size (0 = whole frames); the VAE is convolutional
    kl_weight: float = 1e-6
    stats_clips: int = 64  # clips used to measure the latent mean/std after training
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3))


@dataclass(frozen=True, kw_only=True, slots=True)
class DecoderStage(LoopConfig):
    """Fine-tune the VAE decoder with the encoder frozen, so latents, teacher and students stay
    valid (the pattern of decoder-only VAE fine-tunes). Whole frames; extra loss on the mouth:
    every pixel's L1 + MSE weighs 1 + `mouth_weight` x the target's mouth mask (the soft
    mouth-interior map, dilated by `mouth_dilate` pixels to take in the lips), and
    `mouth_map_weight` x the mean |map(output) - map(target)| in percent of the frame (world only).
    `eval_clips` held-out clips measure the round-trip lip-sync before and after. From step
    `temporal_from`, `temporal_weight` x the mean |(output[t] - output[t-1]) - (target[t] -
    target[t-1])| (weighted as the pixel loss): frame-to-frame change the target does not have is
    flicker."""

    clip_frames: int = 17
    mouth_weight: float = 20.0
    mouth_map_weight: float = 1.0
    mouth_dilate: int = 2
    temporal_weight: float = 0.0
    temporal_from: int = 0
    eval_clips: int = 12
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=20))


@dataclass(frozen=True, kw_only=True, slots=True)
class TeacherStage(LoopConfig):
    """Bidirectional flow-matching teacher. `checkpoint` = use an existing teacher, do not train.
    `mouth_weight`: the loss at each latent position weighs 1 + this x the clip's mouth region
    (world latent sets store it): the mouth is ~3 % of the latent grid but all of lip-sync."""

    checkpoint: str | None = None
    mouth_weight: float = 0.0
    timestep_shift: float = 5.0
    drop_text_audio: float = 0.1  # the CFG unconditional branch: text and audio dropped together
    drop_text: float = 0.05
    drop_audio: float = 0.05
    ema_decay: float = 0.995  # the saved teacher is this EMA of the weights; 0 = no EMA
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4))


@dataclass(frozen=True, kw_only=True, slots=True)
class TrajectoryStage:
    num_samples: int = 256
    num_steps: int = 48
    shift: float = 5.0
    guidance: float = 6.0
    keep_steps: tuple[int, ...] = (0, 12, 24, 36, 48)
    shard_size: int = 32
    batch_size: int = 16


@dataclass(frozen=True, kw_only=True, slots=True)
class ODEInitStage(LoopConfig):
    plateau_window: int = 200  # steps per averaging window
    plateau_tol: float = 0.02  # relative improvement below which the loss has plateaued
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4))


@dataclass(frozen=True, kw_only=True, slots=True)
class DMDStage(LoopConfig):
    num_blocks: int = 4  # blocks the real and fake scores see and the gradient reaches (the rollout's last)
    # Long rollouts (> num_blocks): each step's rollout length is drawn from [num_blocks, this] blocks
    # and runs with the model's inference KV cache (sinks + ring, its RoPE positions); 0 = num_blocks
    max_rollout_blocks: int = 0
    guidance: float = 6.0  # real score CFG, `uncond + w (cond - uncond)`
    timestep_min: float = 20.0
    timestep_max: float = 980.0
    timestep_shift: float = 5.0
    critic_per_gen: int = 5  # critic updates per generator update
    critic_warmup: int = 20  # critic-only steps before the first generator update
    ema_decay: float = 0.99
    ema_start: int = 200
    gen_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=4e-6, betas=(0.0, 0.999), grad_clip=10.0))
    critic_optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=8e-7, betas=(0.0, 0.999), grad_clip=10.0)
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class Recipe:
    name: str
    model: ModelConfig
    out: Path
    stages: tuple[str, ...] = STAGES
    seed: int = 0
    device: str = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"
    parallel: Literal["ddp", "fsdp"] = "ddp"  # how models are wrapped under torchrun
    grad_checkpointing: bool = False  # DiT blocks recompute activations in backward (whole-sequence passes)
    world: WorldDataConfig = field(default_factory=WorldDataConfig)
    vae: VAEStage = field(default_factory=VAEStage)
    decoder: DecoderStage = field(default_factory=DecoderStage)
    teacher: TeacherStage = field(default_factory=TeacherStage)
    trajectories: TrajectoryStage = field(default_factory=TrajectoryStage)
    ode_init: ODEInitStage = field(default_factory=ODEInitStage)
    dmd: DMDStage = field(default_factory=DMDStage)
    max_steps: int | None = None  # set by --max-steps (`bound_to_steps`): a smoke run

    def stage_dir(self, stage: str) -> Path:
        return self.out / stage


def load_recipe(path: Path, *, out: Path | None = None, max_steps: int | None = None) -> Recipe:
    """Read and validate a recipe; `out` and `max_steps` override the file (the CLI's flags)."""
    path = Path(path)
    if path.is_dir():
        path = path / "recipe.yaml"
    if not path.is_file():
        raise UserError(f"recipe {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"recipe {path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe {path}: must be a mapping")
    recipe = parse_recipe(data)
    if out is not None:
        recipe = dataclasses.replace(recipe, out=Path(out))
    if max_steps is not None:
        recipe = bound_to_steps(recipe, max_steps)
    return recipe


def bound_to_steps(r: Recipe, max_steps: int) -> Recipe:
    """`--max-steps N`: every training stage runs N steps, and the data the stages prepare is cut to
    what N steps can use, so a whole recipe runs end to end in minutes. The latent set
    (`world.latent_clips`) keeps the clips the teacher and DMD steps can draw (steps x batch, at
    least one batch) and the trajectories; the trajectories (`trajectories.num_samples`) those the
    ODE-init steps can draw. Both are rounded up to whole shards (the shards a later full run
    extends). A later run without the flag in the same folder treats the smaller outputs as
    unfinished (`markers.stage_done`) and makes them again at full size."""
    from livetalk_cli.distill import data

    _check(max_steps >= 0, "--max-steps must be >= 0")
    r = dataclasses.replace(r, max_steps=max_steps,
                            **{s: dataclasses.replace(getattr(r, s), steps=max_steps) for s in TRAINING_STAGES})

    def used(stage: LoopConfig) -> int:
        return max(stage.steps, 1) * stage.batch_size

    t = r.trajectories
    ode_draws = used(r.ode_init) if "ode_init" in r.stages else t.batch_size
    samples = min(t.num_samples, _round_up(ode_draws, t.shard_size))
    draws = [samples]
    if "teacher" in r.stages and not r.teacher.checkpoint:
        draws.append(used(r.teacher))
    if "dmd" in r.stages:
        draws.append(used(r.dmd))
    clips = min(r.world.num_latent_clips, _round_up(max(draws), data.SHARD))
    return dataclasses.replace(r, trajectories=dataclasses.replace(t, num_samples=samples),
                               world=dataclasses.replace(r.world, latent_clips=clips))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def parse_recipe(data: dict[str, Any]) -> Recipe:
    """Validate recipe data (a relative `out` is relative to the working directory)."""
    data = dict(data)
    model = data.pop("model", None)
    overrides = data.pop("model_overrides", {})
    if not isinstance(model, str):
        raise UserError("recipe: 'model' must be a preset name")
    if "max_steps" in data:
        raise UserError("recipe: max_steps is not a recipe key (it is the --max-steps flag)")
    cfg = preset(model)
    if overrides:
        merged = cfg.to_dict()
        _deep_update(merged, overrides, "model_overrides")
        cfg = ModelConfig.from_dict(merged)
    out = data.pop("out", f"runs/{data.get('name', model)}")
    recipe: Recipe = _build(Recipe, {**data, "model": cfg, "out": str(out)}, "recipe")
    _validate(recipe)
    return recipe


def _validate(r: Recipe) -> None:
    unknown = [s for s in r.stages if s not in STAGES]
    _check(not unknown, f"stages: unknown stage(s) {unknown}; stages are {list(STAGES)}")
    for name in TRAINING_STAGES:
        stage = getattr(r, name)
        stage.validate_loop(name)
        for f in dataclasses.fields(stage):
            if isinstance(getattr(stage, f.name), OptimConfig):
                getattr(stage, f.name).validate(f"{name}.{f.name}")
    tf = r.model.vae.temporal_factor
    sf = r.model.vae.spatial_factor
    _check(r.vae.crop == 0 or (r.vae.crop % sf == 0 and r.vae.crop <= min(r.model.height, r.model.width)),
           f"vae.crop must be 0 or a multiple of {sf} no larger than the frame")
    clip_lengths = [("world.clip_frames", r.world.clip_frames), ("vae.clip_frames", r.vae.clip_frames),
                    ("decoder.clip_frames", r.decoder.clip_frames)]
    if r.vae.long_clip_frames:
        clip_lengths.append(("vae.long_clip_frames", r.vae.long_clip_frames))
    for where, frames in clip_lengths:
        _check(frames >= 1 + tf and (frames - 1) % tf == 0, f"{where} must be 1 + {tf}k frames (k >= 1)")
    _check(r.vae.long_clip_from >= 0, "vae.long_clip_from must be >= 0")
    d = r.decoder
    _check(min(d.mouth_weight, d.mouth_map_weight, d.mouth_dilate, d.eval_clips, d.temporal_weight,
               d.temporal_from) >= 0,
           "decoder: mouth_weight, mouth_map_weight, mouth_dilate, eval_clips, temporal_weight, temporal_from "
           "must be >= 0")
    latents = 1 + (r.world.clip_frames - 1) // tf
    bf = r.model.stream.block_frames
    _check(latents % bf == 0, f"world.clip_frames gives {latents} latent frames, not a multiple of block "
                              f"size {bf}")
    _check(r.dmd.num_blocks * bf <= latents, f"dmd.num_blocks x {bf} exceeds the clip's {latents} latent frames")
    t = r.trajectories
    _check(t.num_steps >= 1 and t.num_samples >= 1 and t.shard_size >= 1 and t.batch_size >= 1,
           "trajectories: num_steps, num_samples, shard_size, batch_size must be >= 1")
    _check(all(0 <= s <= t.num_steps for s in t.keep_steps) and t.num_steps in t.keep_steps,
           "trajectories.keep_steps must lie in [0, num_steps] and include num_steps")
    student = len(t.keep_steps) - 1
    _check(student == r.model.stream.num_steps,
           f"trajectories.keep_steps keeps {student} noisy steps but the student takes {r.model.stream.num_steps}")
    kept = sampling_sigmas(t.num_steps, t.shift)[list(t.keep_steps[:-1])]
    wanted = sampling_sigmas(r.model.stream.num_steps, r.model.stream.shift)
    _check(bool(torch.allclose(kept, wanted, atol=1e-6)),
           "trajectories.keep_steps (with trajectories.num_steps/shift) must sit at the student's timesteps "
           f"{[round(float(s) * 1000, 1) for s in wanted]}")
    _check(0 <= r.world.latent_clips <= r.world.train_clips, "world.latent_clips must be in [0, world.train_clips]")
    _check(t.num_samples <= r.world.num_latent_clips,
           "trajectories.num_samples must be <= world.train_clips (and world.latent_clips when set)")
    d = r.dmd
    _check(d.num_blocks >= 1, "dmd.num_blocks must be >= 1")
    _check(d.max_rollout_blocks == 0 or d.max_rollout_blocks >= d.num_blocks,
           "dmd.max_rollout_blocks must be 0 (rollouts of num_blocks) or >= dmd.num_blocks")
    _check(0 <= d.timestep_min < d.timestep_max <= 1000, "dmd: 0 <= timestep_min < timestep_max <= 1000")
    _check(d.critic_per_gen >= 1 and d.critic_warmup >= 0, "dmd: critic_per_gen >= 1, critic_warmup >= 0")
    _check(0 < d.ema_decay < 1 and d.ema_start >= 0, "dmd: ema_decay in (0, 1), ema_start >= 0")
    for name in ("drop_text_audio", "drop_text", "drop_audio"):
        _check(0 <= getattr(r.teacher, name) < 1, f"teacher.{name} must be in [0, 1)")
    _check(0 <= r.teacher.ema_decay < 1, "teacher.ema_decay must be in [0, 1)")
    _check(r.teacher.mouth_weight >= 0, "teacher.mouth_weight must be >= 0")
    _check(r.world.train_clips >= 1, "world.train_clips must be >= 1")


# --- typed building from plain YAML data --------------------------------------------------


def _build(kind: type, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(value) and type(value) is kind:
        return value
    if not isinstance(value, dict):
        raise UserError(f"{where} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    hints = typing.get_type_hints(kind)
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in value.items()}
    try:
        return kind(**kwargs)
    except TypeError as e:
        raise UserError(f"{where}: {e}") from None


def _coerce(tp: Any, v: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], v, where)
    if origin is Literal:
        if v not in args:
            raise UserError(f"{where} must be one of {', '.join(map(str, args))}; got {v!r}")
        return v
    if origin is tuple:
        if not isinstance(v, (list, tuple)):
            raise UserError(f"{where} must be a list")
        item = args[0]
        if len(args) == 2 and args[1] is not Ellipsis or len(args) > 2:
            if len(v) != len(args):
                raise UserError(f"{where} must have {len(args)} items")
            return tuple(_coerce(a, x, where) for a, x in zip(args, v, strict=True))
        return tuple(_coerce(item, x, where) for x in v)
    if tp is Path:
        return Path(_coerce(str, v, where))
    if dataclasses.is_dataclass(tp):
        return _build(tp, v, where)
    if tp is float and isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if tp is float and isinstance(v, str):  # YAML reads 1e-4 (no dot) as a string
        try:
            return float(v)
        except ValueError:
            pass
    if tp in (int, str, bool) and type(v) is tp:
        return v
    if tp is ModelConfig and isinstance(v, ModelConfig):
        return v
    raise UserError(f"{where} must be {getattr(tp, '__name__', tp)}; got {v!r}")


def _deep_update(base: dict[str, Any], new: dict[str, Any], where: str) -> None:
    if not isinstance(new, dict):
        raise UserError(f"{where} must be a mapping")
    for k, v in new.items():
        if k not in base:
            raise UserError(f"{where}: unknown key {k!r}")
        if isinstance(base[k], dict):
            _deep_update(base[k], v, f"{where}.{k}")
        else:
            base[k] = v


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(f"recipe: {message}")


def recipe_dict(r: Recipe) -> dict[str, Any]:
    """JSON-ready view of a recipe (stored beside checkpoints)."""
    d = dataclasses.asdict(r)
    d["out"] = str(r.out)
    return d
