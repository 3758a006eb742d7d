"""Stage `ode_init`: the causal student regresses the teacher's ODE solutions.

The student starts from the teacher's weights. Per sample: one teacher trajectory, and for every
block one of the student's timesteps k (the trajectory's latents at that step); all blocks go
through the student in one forward under the block-causal mask with per-frame timesteps; the
loss is the MSE of the predicted x0 (x_t - sigma v) against the trajectory's clean end, over the
generated frames. Latent frame 0 is the reference latent at its block's timestep (as the block
sampler pins it).

Plateau: the mean loss of consecutive windows of `plateau_window` steps; the loss has plateaued
when a window improves on the previous one by less than `plateau_tol` (relative). The step is
recorded in `ode_init/done.json`; training runs the recipe's full `steps`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from livetalk_cli.distill.context import StageContext, save_weights
from livetalk_cli.distill.data import load_latents
from livetalk_cli.distill.flow import FlowModel, generated_mask, masked_mse, pin_reference
from livetalk_cli.distill.markers import checkpoint_meta, mark_done, stage_done
from livetalk_cli.distill.trainer import (
    TrainState,
    generator,
    make_optimizer,
    run_loop,
    train_step,
    wrap,
)
from livetalk_cli.distill.trajectories import load_trajectories
from livetalk_cli.sampling.schedule import sampling_sigmas


def plateau_update(extra: dict, step: int, loss: float, window: int, tol: float) -> None:
    """Accumulate window means in `extra` (checkpointed) and record the first plateau step."""
    extra["sum"] = extra.get("sum", 0.0) + loss
    extra["n"] = extra.get("n", 0) + 1
    if extra["n"] < window:
        return
    mean = extra["sum"] / extra["n"]
    windows = extra.setdefault("windows", [])
    windows.append(mean)
    extra["sum"], extra["n"] = 0.0, 0
    if len(windows) >= 2 and extra.get("plateau_step") is None:
        prev = windows[-2]
        if prev - mean < tol * prev:
            extra["plateau_step"] = step + 1


def run_ode_init_stage(ctx: StageContext) -> None:
    r, ranks = ctx.recipe, ctx.ranks
    st = r.ode_init
    if stage_done(ctx, "ode_init"):
        return
    data = load_latents(ctx.latents_dir, r.world.num_latent_clips)
    traj, traj_index = load_trajectories(ctx)
    text = ctx.text_encoder().requires_grad_(False)
    dit = ctx.load_dit("teacher")
    model = wrap(FlowModel(dit), ranks, r.parallel)
    params = list(dit.parameters())
    opt = make_optimizer(params, st.optim)
    state = TrainState({"dit": model}, {"dit": (model, opt)})
    bf = r.model.stream.block_frames
    sig = sampling_sigmas(r.model.stream.num_steps, r.model.stream.shift).float()
    num_k = sig.shape[0]
    f = traj.shape[3]
    nb = f // bf
    mask = generated_mask(f, ctx.device)

    def step_fn(step: int) -> dict[str, float]:
        def loss_fn(chunk: list[int]) -> tuple[Tensor, dict[str, float]]:
            xs, sigmas, clean, clips = [], [], [], []
            for i in chunk:
                g = generator(r.seed, "ode_init", step, i)
                j = int(torch.randint(traj.shape[0], (1,), generator=g))
                ks = torch.randint(num_k, (nb,), generator=g).repeat_interleave(bf)  # (F,) step per frame
                path = traj[j].float()  # (K, C, F, h, w)
                xs.append(path[ks, :, torch.arange(f)].permute(1, 0, 2, 3))  # (C, F, h, w)
                sigmas.append(sig[ks])
                clean.append(path[-1])
                clips.append(int(traj_index[j]))
            _, audio, prompts = data.batch(clips, ctx.device)
            target = torch.stack(clean).to(ctx.device)
            ref = data.references(clips, ctx.device)
            x_t = pin_reference(torch.stack(xs).to(ctx.device), ref)
            s = torch.stack(sigmas).to(ctx.device)  # (B, F)
            with torch.no_grad():
                context = text(prompts)
            v = model(x_t, s * 1000, context, audio, ref, block_frames=bf)
            x0 = x_t - s[:, None, :, None, None] * v
            loss = masked_mse(x0, target, mask)
            return loss, {"loss": loss.item()}

        logs = train_step(model, opt, params, st.optim, st, step, ranks, loss_fn, ctx.precision)
        mean_loss = ranks.mean({"loss": logs["loss"]})["loss"]
        plateau_update(state.extra, step, mean_loss, st.plateau_window, st.plateau_tol)
        return logs

    run_loop(stage="ode_init", directory=ctx.out / "ode_init", loop=st, state=state, ranks=ranks,
             step_fn=step_fn, meta=checkpoint_meta(ctx, "ode_init"), samples_per_step=st.batch_size,
             on_progress=lambda d, t, v: ctx.progress("ode_init", d, t, v))
    save_weights(dit, ctx.out / "ode_init" / "dit.safetensors", ranks)
    mark_done(ctx, "ode_init", {"steps": st.steps, "plateau_step": state.extra.get("plateau_step"),
                                "window_means": state.extra.get("windows", [])})
