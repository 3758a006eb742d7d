"""Stage `trajectories`: teacher ODE trajectories at the student's timesteps.

For training clips 0..num_samples-1 (their reference latent, prompt and audio) the teacher
samples from seeded noise with `num_steps` Euler steps, shift `shift` and CFG whose
unconditional branch drops text and audio together (two forwards per step). The latents at
`keep_steps` are stored: with 48 steps and shift 5, steps [0, 12, 24, 36] sit exactly at the
4-step student's timesteps and 48 is the clean end.

Shards: `trajectories/shard_00000.safetensors` with `latents` (n, K, C, F, h, w) fp16 and
`index` (n,) clip indices into the latent set, and in the metadata `made_from`, the ids of the
teacher and latent set they come from (`markers.made_from`); written atomically, resumable by
shard (a shard from another teacher or latent set, or with fewer samples, is made again).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from livetalk_cli.distill.context import StageContext
from livetalk_cli.distill.data import LatentSet, load_latents, shard_header
from livetalk_cli.distill.flow import FlowModel
from livetalk_cli.distill.markers import INPUTS, made_from, mark_done, stage_done
from livetalk_cli.distill.trainer import generator
from livetalk_cli.errors import UserError
from livetalk_cli.files import save_safetensors_atomic
from livetalk_cli.models.text import BuiltinTextEncoder
from livetalk_cli.sampling.teacher import teacher_sample


def run_trajectory_stage(ctx: StageContext) -> None:
    r, ranks = ctx.recipe, ctx.ranks
    st = r.trajectories
    if stage_done(ctx, "trajectories") and trajectories_ready(ctx) == st.num_samples:
        return
    directory = ctx.out / "trajectories"
    directory.mkdir(parents=True, exist_ok=True)
    data = load_latents(ctx.latents_dir, r.world.num_latent_clips)
    flow = FlowModel(ctx.load_dit("teacher").eval().requires_grad_(False))
    text = ctx.text_encoder()
    ranges = shard_ranges(ctx)
    num_shards = len(ranges)
    c, f, h, w = data.latents.shape[1:]
    tag = {"made_from": _tag(ctx)}
    done = 0
    for s, idx in enumerate(ranges):
        path = directory / f"shard_{s:05d}.safetensors"
        if s % ranks.world != ranks.rank or shard_ready(ctx, path, len(idx)):
            done += 1
            continue
        kept = []
        for b in range(0, len(idx), st.batch_size):
            batch = idx[b: b + st.batch_size]
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.precision == torch.bfloat16):
                kept.append(sample_batch(ctx, flow, text, data, batch, (c, f, h, w)))
        save_safetensors_atomic({"latents": torch.cat(kept).half().contiguous(), "index": torch.tensor(list(idx))},
                                path, metadata=tag)
        done += 1
        ctx.progress("trajectories", done, num_shards)
    ranks.barrier()
    mark_done(ctx, "trajectories", {"num_samples": st.num_samples, "num_steps": st.num_steps,
                                    "keep_steps": list(st.keep_steps), "guidance": st.guidance})


@torch.no_grad()
def sample_batch(ctx: StageContext, flow: FlowModel, text: BuiltinTextEncoder, data: LatentSet, batch: list[int],
                 shape: tuple[int, int, int, int]) -> torch.Tensor:
    """Teacher trajectories for clip indices `batch` → (n, K, C, F, h, w) fp32 on the CPU."""
    st = ctx.recipe.trajectories
    x0, audio, prompts = data.batch(batch, ctx.device)
    ref = data.references(batch, ctx.device)
    noise = torch.stack([torch.randn(shape, generator=generator(ctx.recipe.seed, "trajectories", 0, i))
                         for i in batch]).to(ctx.device)
    context = text(prompts)
    f = shape[1]
    cond = flow.conditioning(context, audio, ref, f)
    uncond = flow.conditioning(text([""]).expand_as(context), torch.zeros_like(audio), ref, f)
    _, kept = teacher_sample(flow.dit, noise, cond, uncond, num_steps=st.num_steps, shift=st.shift,
                             guidance=st.guidance, ref=ref, keep_steps=st.keep_steps)
    return torch.stack([kept[k] for k in st.keep_steps], dim=1).float().cpu()


def shard_ranges(ctx: StageContext) -> list[range]:
    """The clip indices of each shard: [0, num_samples) in `shard_size` pieces."""
    st = ctx.recipe.trajectories
    return [range(s, min(s + st.shard_size, st.num_samples)) for s in range(0, st.num_samples, st.shard_size)]


def _tag(ctx: StageContext) -> str:
    return json.dumps(made_from(ctx, "trajectories"), sort_keys=True)


def shard_ready(ctx: StageContext, path: Path, rows: int) -> bool:
    """`path` holds at least `rows` samples from the teacher and latent set there now (an untagged
    shard, from before tags, counts as made from untagged inputs)."""
    header = shard_header(path)
    if header is None or header[0] < rows:
        return False
    untagged = json.dumps(dict.fromkeys(INPUTS["trajectories"]), sort_keys=True)
    return header[1].get("made_from", untagged) == _tag(ctx)


def trajectories_ready(ctx: StageContext) -> int:
    """How many of the recipe's trajectories are there, in whole shards from the current inputs."""
    directory = ctx.out / "trajectories"
    return sum(len(idx) for s, idx in enumerate(shard_ranges(ctx))
               if shard_ready(ctx, directory / f"shard_{s:05d}.safetensors", len(idx)))


def load_trajectories(ctx: StageContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipe's trajectories → (latents (N, K, C, F, h, w) fp16, clip index (N,))."""
    st = ctx.recipe.trajectories
    directory = ctx.out / "trajectories"
    lat, idx = [], []
    for s in range(len(shard_ranges(ctx))):
        path = directory / f"shard_{s:05d}.safetensors"
        if not path.is_file():
            raise UserError(f"{path} not found: run --stage trajectories first")
        t = load_file(str(path))
        lat.append(t["latents"])
        idx.append(t["index"])
    return torch.cat(lat)[: st.num_samples], torch.cat(idx)[: st.num_samples]
