"""Stage `dmd`: on-policy distribution matching distillation (Self Forcing / LiveTalk, REFERENCE §5).

Iteration `step`:
1. Rollout: the student generates `num_blocks` blocks autoregressively with its KV cache, exactly
   as at inference. One exit step k in {0..K-1}, drawn from the step's shared seed (so every rank
   and every block uses the same k), ends each block: steps before k run without gradient, step k
   runs with gradient and its x0 is the block's output; the t = 0 cache refill runs without
   gradient, so no gradient crosses blocks. Long rollouts (`max_rollout_blocks`): the step's
   length is drawn from [num_blocks, max_rollout_blocks], the cache is the model's inference cache
   (sinks + a ring that wraps), the blocks before the last `num_blocks` run without gradient, and
   the scores below see those last blocks as a stream-start clip (first latent := the reference,
   audio from the frame before: `scored_audio`).
2. Generator update (after `critic_warmup` critic-only steps, then every `critic_per_gen`-th
   step): t ~ U[0, 1) shifted by `timestep_shift`, x 1000, clamped to [timestep_min, timestep_max],
   one t per sample shared by its frames; x_t = (1 - s) x + s eps; real_x0 from the frozen teacher
   with CFG (`uncond + w (cond - uncond)`, uncond = no text and no audio), fake_x0 from the critic;
   grad = (fake_x0 - real_x0) / mean|x - real_x0| per sample, nan_to_num;
   loss = 0.5 * mse(x, (x - grad).detach()) in float64.
3. Critic update (every step): flow matching on the detached rollout, MSE(v, eps - x) over the
   generated frames (the reference frame is masked out).
AdamW betas (0, 0.999), grad clipping, gradient accumulation, and an EMA of the student from
`ema_start` (the saved student is the EMA once it has started).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
from torch import Tensor, nn

from livetalk_cli.config import StreamConfig
from livetalk_cli.distill.context import StageContext, save_weights
from livetalk_cli.distill.data import load_latents
from livetalk_cli.distill.flow import FlowModel, generated_mask, masked_mse, pin_reference
from livetalk_cli.distill.markers import checkpoint_meta, mark_done, stage_done
from livetalk_cli.distill.trainer import (
    TrainState,
    ema_update,
    generator,
    make_optimizer,
    run_loop,
    train_step,
    unwrap,
    wrap,
)
from livetalk_cli.models.dit import Conditioning
from livetalk_cli.sampling.block_sampler import denoise, refill
from livetalk_cli.sampling.kv_cache import BlockKVCache
from livetalk_cli.sampling.schedule import sampling_sigmas, shift_sigma


class Rollout(nn.Module):
    """The student generating blocks with its KV cache; one forward = one rollout (so DDP sees a
    single forward per backward however many DiT passes the rollout makes)."""

    def __init__(self, flow: FlowModel, stream: StreamConfig, *, inference_cache: bool = False):
        super().__init__()
        self.flow = flow
        self.stream = stream
        self.inference_cache = inference_cache
        self.register_buffer("sigmas", sampling_sigmas(stream.num_steps, stream.shift).float(), persistent=False)

    def forward(self, noise: Tensor, context: Tensor, audio: Tensor, ref: Tensor, exit_step: int,
                scored_blocks: int | None = None) -> Tensor:
        """noise: (K, B, C, F, h, w) one draw per step → the scores' view (B, C, W, h, w) of the
        last `scored_blocks` blocks (default: all), W = scored_blocks x block frames: their latents
        with the first replaced by the pinned reference (a stream-start clip, as the teacher was
        trained on; from the stream's start that latent *is* the reference). Blocks before them run
        without gradient; in the scored ones the gradient flows only via the exit step."""
        dit = self.flow.dit
        k, b, _, f, h, w = noise.shape
        bf = self.stream.block_frames
        blocks = f // bf
        scored = blocks if scored_blocks is None else scored_blocks
        _, ph, pw = dit.cfg.patch_size
        if self.inference_cache:  # the model's own sinks + ring (+ relative positions), as at inference
            stream = dataclasses.replace(self.stream, num_steps=k)
        else:
            # Every earlier block kept (no sinks, no window), as LiveTalk trains; nothing is evicted,
            # so absolute and relative positions coincide (absolute needs no pre-RoPE copy).
            stream = StreamConfig(block_frames=bf, num_steps=k, shift=self.stream.shift, sink_frames=0,
                                  window_frames=f - bf, relative_rope=False)
        cache = BlockKVCache(dit.cfg, stream, (h // ph, w // pw), batch=b, device=noise.device,
                             dtype=next(dit.parameters()).dtype)
        cond = self.flow.conditioning(context, audio, ref, f)
        ref = ref[:, :, :1]  # the pinned latent 0 (cond.y holds every position's reference latent)
        pin0 = torch.zeros(1, 1, bf, 1, 1, device=noise.device)
        pin0[:, :, 0] = 1
        outputs = []
        for blk in range(blocks):  # the sampler's per-block sequence: denoise, refill, commit
            fs = slice(blk * bf, (blk + 1) * bf)
            cb = Conditioning(cond.text_kv, cond.y[:, :, fs], cond.audio[:, :, fs])
            pin = pin0 if blk == 0 else torch.zeros_like(pin0)
            with torch.set_grad_enabled(torch.is_grad_enabled() and blk >= blocks - scored):
                x0 = denoise(dit, cache.window(), noise[:, :, :, fs], self.sigmas, cb, ref, pin, grad_step=exit_step)
            if blk >= blocks - scored:
                outputs.append(x0)
            with torch.no_grad():
                cache.commit(*refill(dit, cache.window(), x0.detach(), cb))
        return pin_reference(torch.cat(outputs, dim=2), ref)


def scored_audio(audio: Tensor, total_latents: int, scored_latents: int, temporal_factor: int) -> Tensor:
    """The audio of the scores' view of a rollout's last `scored_latents` latents (`Rollout`): its
    video frames, preceded by the frame before them, which takes the reference's place
    (audio: (B, T, A) of the whole rollout from the stream's start → (B, 1 + tf (W - 1), A))."""
    start = temporal_factor * (total_latents - scored_latents)
    return audio[:, start: start + 1 + temporal_factor * (scored_latents - 1)]


def dmd_loss(x: Tensor, real: FlowModel, fake: FlowModel, context: Tensor, empty: Tensor, audio: Tensor,
             ref: Tensor, sigma: Tensor, eps: Tensor, guidance: float, mask: Tensor) -> Tensor:
    """Distribution matching loss on the student's samples x (B, C, F, h, w); sigma (B,)."""
    with torch.no_grad():
        s = sigma.view(-1, 1, 1, 1, 1)
        x_t = pin_reference((1 - s) * x.detach() + s * eps, ref)
        t = (sigma * 1000)[:, None].expand(-1, x.shape[2])
        v_c = real(x_t, t, context, audio, ref)
        v_u = real(x_t, t, empty.expand_as(context), torch.zeros_like(audio), ref)
        real_x0 = x_t - s * (v_u + guidance * (v_c - v_u))
        fake_x0 = x_t - s * fake(x_t, t, context, audio, ref)
        diff = (x.detach() - real_x0).abs() * mask
        norm = diff.flatten(1).sum(1) / mask.expand_as(diff).flatten(1).sum(1)
        grad = torch.nan_to_num((fake_x0 - real_x0) / norm.view(-1, 1, 1, 1, 1))
    target = (x - grad).detach().double()
    err = (x.double() - target).square() * mask
    return 0.5 * (err.flatten(1).sum(1) / mask.expand_as(err).flatten(1).sum(1)).mean()


def run_dmd_stage(ctx: StageContext) -> None:
    r, ranks = ctx.recipe, ctx.ranks
    st = r.dmd
    if stage_done(ctx, "dmd"):
        return
    data = load_latents(ctx.latents_dir, r.world.num_latent_clips)
    text = ctx.text_encoder().requires_grad_(False)
    with torch.no_grad():
        empty = text([""])
    real = FlowModel(ctx.load_dit("teacher")).eval().requires_grad_(False)
    critic_flow = FlowModel(ctx.load_dit("teacher"))
    critic = wrap(critic_flow, ranks, r.parallel)
    gen_dit = ctx.load_dit("ode_init")
    ema = copy.deepcopy(gen_dit).requires_grad_(False)  # full weights, taken before sharding
    long = st.max_rollout_blocks > st.num_blocks
    rollout = wrap(Rollout(FlowModel(gen_dit), r.model.stream, inference_cache=long), ranks, r.parallel)
    gen_params, critic_params = list(gen_dit.parameters()), list(critic_flow.parameters())
    gen_opt, critic_opt = make_optimizer(gen_params, st.gen_optim), make_optimizer(critic_params, st.critic_optim)
    state = TrainState({"generator": rollout, "critic": critic, "ema": ema},
                       {"generator": (rollout, gen_opt), "critic": (critic, critic_opt)})
    _, c, _, h, w = data.latents.shape
    clip_audio = data.audio.shape[1]
    bf, k = r.model.stream.block_frames, r.model.stream.num_steps
    tf = r.model.vae.temporal_factor
    f = st.num_blocks * bf  # the latents the scores see
    mask = generated_mask(f, ctx.device)

    def rollout_blocks(step: int) -> int:
        """This step's rollout length (every rank and sample: one shape per step)."""
        if not long:
            return st.num_blocks
        g = generator(r.seed, "dmd", step, -1, "length")
        return int(torch.randint(st.num_blocks, st.max_rollout_blocks + 1, (1,), generator=g))

    def draws(step: int, chunk: list[int], salt: str, blocks: int) -> dict[str, Tensor]:
        n = blocks * bf  # the rollout's latents
        clips, noise, sig, eps, extra = [], [], [], [], []
        for i in chunk:
            g = generator(r.seed, "dmd", step, i, salt)
            clips.append(int(torch.randint(len(data), (1,), generator=g)))
            noise.append(torch.randn((k, c, n, h, w), generator=g))
            u = shift_sigma(torch.rand((), generator=g), st.timestep_shift) * 1000
            sig.append(u.clamp(st.timestep_min, st.timestep_max) / 1000)
            eps.append(torch.randn((c, f, h, w), generator=g))
            # a rollout longer than a clip hears the clip's speech, then other clips' speech after it
            if long:
                more = max(0, math.ceil((1 + tf * (n - 1) - clip_audio) / clip_audio))
                extra.append(torch.randint(len(data), (more,), generator=g))
        x0, audio, prompts = data.batch(clips, ctx.device)
        if extra and extra[0].numel():  # (B, more, T, A) → after the clip's own T frames
            audio = torch.cat([audio, data.audio[torch.stack(extra)].flatten(1, 2).float().to(ctx.device)], dim=1)
        with torch.no_grad():
            context = text(prompts)
        audio = audio[:, : 1 + tf * (n - 1)]
        return {"noise": torch.stack(noise, 1).to(ctx.device), "ref": data.references(clips, ctx.device),
                "audio": audio, "scored_audio": scored_audio(audio, n, f, tf), "context": context,
                "sigma": torch.stack(sig).float().to(ctx.device), "eps": torch.stack(eps).to(ctx.device)}

    def step_fn(step: int) -> dict[str, float]:
        exit_step = int(torch.randint(k, (1,), generator=generator(r.seed, "dmd", step, -1, "exit")))
        blocks = rollout_blocks(step)
        gen_turn = step >= st.critic_warmup and (step - st.critic_warmup) % st.critic_per_gen == 0
        samples: dict[int, Tensor] = {}
        logs: dict[str, float] = {"exit_step": float(exit_step), "rollout_blocks": float(blocks)}
        if gen_turn:
            def gen_loss(chunk: list[int]) -> tuple[Tensor, dict[str, float]]:
                d = draws(step, chunk, "gen", blocks)
                x = rollout(d["noise"], d["context"], d["audio"], d["ref"], exit_step, st.num_blocks)
                samples[chunk[0]] = x.detach()
                loss = dmd_loss(x, real, critic_flow, d["context"], empty, d["scored_audio"], d["ref"], d["sigma"],
                                d["eps"], st.guidance, mask)
                return loss, {"dmd_loss": loss.item()}

            logs.update(train_step(rollout, gen_opt, gen_params, st.gen_optim, st, step, ranks, gen_loss,
                                   ctx.precision, prefix="gen_"))
            if step >= st.ema_start:
                ema_update(ema, gen_dit, st.ema_decay if state.extra.get("ema_started") else 0.0)
                state.extra["ema_started"] = True

        def critic_loss(chunk: list[int]) -> tuple[Tensor, dict[str, float]]:
            d = draws(step, chunk, "gen", blocks)
            x = samples.get(chunk[0])
            if x is None:
                with torch.no_grad():
                    x = rollout(d["noise"], d["context"], d["audio"], d["ref"], exit_step, st.num_blocks)
            dc = draws(step, chunk, "critic", st.num_blocks)
            s = dc["sigma"].view(-1, 1, 1, 1, 1)
            x_t = pin_reference((1 - s) * x + s * dc["eps"], d["ref"])
            v = critic(x_t, (dc["sigma"] * 1000)[:, None].expand(-1, f), d["context"], d["scored_audio"], d["ref"])
            loss = masked_mse(v, dc["eps"] - x, mask)
            return loss, {"critic_loss": loss.item()}

        logs.update(train_step(critic, critic_opt, critic_params, st.critic_optim, st, step, ranks, critic_loss,
                               ctx.precision, prefix="critic_"))
        return logs

    run_loop(stage="dmd", directory=ctx.out / "dmd", loop=st, state=state, ranks=ranks, step_fn=step_fn,
             meta=checkpoint_meta(ctx, "dmd"), samples_per_step=st.batch_size,
             on_progress=lambda d, t, v: ctx.progress("dmd", d, t, v))
    used_ema = bool(state.extra.get("ema_started"))
    save_weights(ema if used_ema else unwrap(rollout).flow.dit, ctx.out / "dmd" / "dit.safetensors", ranks)
    mark_done(ctx, "dmd", {"steps": st.steps, "ema": used_ema})
