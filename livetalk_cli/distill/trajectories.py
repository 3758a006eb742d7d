"""Stage `trajectories`: teacher ODE trajectories at the student's timesteps.

For training clips 0..num_samples-1 (their reference latent, prompt and audio) the teacher
samples from seeded noise with `num_steps` Euler steps, shift `shift` and CFG whose
unconditional branch drops text and audio together (two forwards per step). The latents at
`keep_steps` are stored: with 48 steps and shift 5, steps [0, 12, 24, 36] sit exactly at the
4-step student's timesteps and 48 is the clean end.

Shards: `trajectories/shard_00000.safetensors` with `latents` (n, K, C, F, h, w) fp16 and
`index` (n,) clip indices into the latent set; written atomically, resumable by shard.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from livetalk_cli.distill.context import StageContext, mark_done, stage_done
from livetalk_cli.distill.data import LatentSet, load_latents
from livetalk_cli.distill.flow import FlowModel
from livetalk_cli.distill.trainer import generator
from livetalk_cli.files import save_safetensors_atomic
from livetalk_cli.models.text import BuiltinTextEncoder
from livetalk_cli.sampling.teacher import teacher_sample


def run_trajectory_stage(ctx: StageContext) -> None:
    r, ranks = ctx.recipe, ctx.ranks
    st = r.trajectories
    if stage_done(ctx, "trajectories"):
        return
    directory = ctx.out / "trajectories"
    directory.mkdir(parents=True, exist_ok=True)
    data = load_latents(ctx.latents_dir, r.world.train_clips)
    if st.num_samples > len(data):
        raise ValueError(f"trajectories.num_samples {st.num_samples} > {len(data)} training clips")
    flow = FlowModel(ctx.load_dit("teacher").eval().requires_grad_(False))
    text = ctx.text_encoder()
    num_shards = (st.num_samples + st.shard_size - 1) // st.shard_size
    c, f, h, w = data.latents.shape[1:]
    done = 0
    for s in range(num_shards):
        path = directory / f"shard_{s:05d}.safetensors"
        if s % ranks.world != ranks.rank or path.is_file():
            done += 1
            continue
        idx = list(range(s * st.shard_size, min((s + 1) * st.shard_size, st.num_samples)))
        kept = []
        for b in range(0, len(idx), st.batch_size):
            batch = idx[b: b + st.batch_size]
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.precision == torch.bfloat16):
                kept.append(sample_batch(ctx, flow, text, data, batch, (c, f, h, w)))
        save_safetensors_atomic({"latents": torch.cat(kept).half().contiguous(), "index": torch.tensor(idx)}, path)
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


def load_trajectories(ctx: StageContext) -> tuple[torch.Tensor, torch.Tensor]:
    """All shards → (latents (N, K, C, F, h, w) fp16, clip index (N,))."""
    st = ctx.recipe.trajectories
    directory = ctx.out / "trajectories"
    lat, idx = [], []
    for s in range((st.num_samples + st.shard_size - 1) // st.shard_size):
        path = directory / f"shard_{s:05d}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path} missing: run the trajectories stage")
        t = load_file(str(path))
        lat.append(t["latents"])
        idx.append(t["index"])
    return torch.cat(lat), torch.cat(idx)
