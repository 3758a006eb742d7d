"""Stage `teacher`: a bidirectional flow-matching DiT on the encoded world clips.

Per sample: sigma = shift(u, timestep_shift) with u ~ U(0, 1) (the distribution of the shifted
Euler steps the teacher later samples with), x_t = (1 - sigma) x0 + sigma eps with latent frame 0
pinned to the reference latent, loss = MSE(v, eps - x0) over the generated frames, each latent position
weighted 1 + `mouth_weight` x the clip's mouth region (`data.mouth_region`; 0 = plain MSE). Conditions are
dropped per sample: text and audio together with `drop_text_audio` (the CFG unconditional branch),
and each alone with `drop_text` / `drop_audio`. The saved teacher is the EMA of the weights.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from livetalk_cli.distill.context import StageContext, save_weights
from livetalk_cli.distill.data import load_latents
from livetalk_cli.distill.flow import FlowModel, drop_conditions, generated_mask, masked_mse, pin_reference
from livetalk_cli.distill.markers import checkpoint_meta, mark_done, stage_done
from livetalk_cli.distill.trainer import (
    TrainState,
    ema_update,
    generator,
    make_optimizer,
    run_loop,
    train_step,
    wrap,
)
from livetalk_cli.sampling.schedule import shift_sigma


def run_teacher_stage(ctx: StageContext) -> None:
    r, ranks = ctx.recipe, ctx.ranks
    st = r.teacher
    if st.checkpoint or stage_done(ctx, "teacher"):
        return
    data = load_latents(ctx.latents_dir, r.world.num_latent_clips)
    text = ctx.text_encoder().requires_grad_(False)
    with torch.no_grad():
        empty = text([""])
    dit = ctx.new_dit()
    ema = copy.deepcopy(dit).requires_grad_(False) if st.ema_decay > 0 else None  # before sharding
    model = wrap(FlowModel(dit), ranks, r.parallel)
    params = list(dit.parameters())
    opt = make_optimizer(params, st.optim)
    models: dict[str, torch.nn.Module] = {"dit": model}
    if ema is not None:
        models["ema"] = ema
    state = TrainState(models, {"dit": (model, opt)})
    c, f, h, w = data.latents.shape[1:]
    mask = generated_mask(f, ctx.device)

    def step_fn(step: int) -> dict[str, float]:
        def loss_fn(chunk: list[int]) -> tuple[Tensor, dict[str, float]]:
            clips, sig, eps, drops = [], [], [], []
            for i in chunk:
                g = generator(r.seed, "teacher", step, i)
                clips.append(int(torch.randint(len(data), (1,), generator=g)))
                sig.append(shift_sigma(torch.rand((), generator=g), st.timestep_shift))
                eps.append(torch.randn((c, f, h, w), generator=g))
                drops.append(torch.rand(3, generator=g))
            x0, audio, prompts = data.batch(clips, ctx.device)
            sigma = torch.stack(sig).to(ctx.device).view(-1, 1, 1, 1, 1)
            noise = torch.stack(eps).to(ctx.device)
            d = torch.stack(drops).to(ctx.device)
            both = d[:, 0] < st.drop_text_audio
            with torch.no_grad():
                context = text(prompts)
            context, audio = drop_conditions(context, audio, empty, both | (d[:, 1] < st.drop_text),
                                             both | (d[:, 2] < st.drop_audio))
            ref = data.references(clips, ctx.device)
            x_t = pin_reference((1 - sigma) * x0 + sigma * noise, ref)
            t = (sigma.view(-1, 1) * 1000).expand(-1, f)
            v = model(x_t, t, context, audio, ref)
            weight = mask * data.loss_weights(clips, st.mouth_weight, ctx.device) if st.mouth_weight else mask
            loss = masked_mse(v, noise - x0, weight)
            return loss, {"loss": loss.item()}

        logs = train_step(model, opt, params, st.optim, st, step, ranks, loss_fn, ctx.precision)
        if ema is not None:
            ema_update(ema, dit, st.ema_decay)
        return logs

    run_loop(stage="teacher", directory=ctx.out / "teacher", loop=st, state=state, ranks=ranks, step_fn=step_fn,
             meta=checkpoint_meta(ctx, "teacher"), samples_per_step=st.batch_size,
             on_progress=lambda d, t, v: ctx.progress("teacher", d, t, v))
    save_weights(ema if ema is not None else dit, ctx.out / "teacher" / "dit.safetensors", ranks)
    mark_done(ctx, "teacher", {"steps": st.steps, "ema_decay": st.ema_decay})
