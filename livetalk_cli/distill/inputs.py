"""What a stage reads from the stages before it, checked before the stage starts any work.

A missing or out-of-date input is one `UserError` naming it and the stage to run first, e.g.

    stage 'teacher' needs the latent set runs/x/latents (made by stage 'vae'); run --stage vae first

Inputs (`markers.INPUTS`): the VAE (decoder), the latent set (teacher, trajectories, ode_init, dmd),
the teacher (trajectories, ode_init, dmd), the trajectories (ode_init), the ODE-init student (dmd);
and for the stages whose student is exported as a render folder (ode_init, dmd) the VAE that folder
ships: the `decoder` stage's when the recipe runs that stage, else the `vae` stage's. An input made
by an earlier stage is there only when that stage is done for this recipe (`markers.stage_done`):
a `--max-steps` run's teacher does not serve a full run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from livetalk_cli.distill.context import StageContext
from livetalk_cli.distill.data import ANY_VAE, latents_ready
from livetalk_cli.distill.markers import INPUTS, read_marker, stage_done, stage_id, stale_reason
from livetalk_cli.distill.trajectories import trajectories_ready
from livetalk_cli.errors import UserError

EXPORTING = ("ode_init", "dmd")  # stages whose student becomes a render folder (`run.export_student`)


def check_inputs(ctx: StageContext, stage: str) -> None:
    """Raise one UserError when an input `stage` needs now is missing or out of date. A stage that
    is already done needs only what its export needs."""
    if stage == "teacher" and ctx.recipe.teacher.checkpoint:
        return  # nothing to train
    needs = [] if stage_done(ctx, stage) else list(INPUTS[stage])
    checks: list[Callable[[StageContext], str | None]] = [CHECKS[name] for name in needs]
    if stage in EXPORTING:
        checks.append(exported_vae)
    for check in checks:
        problem = check(ctx)
        if problem:
            raise UserError(f"stage {stage!r} needs {problem}")


def _not_done(ctx: StageContext, producer: str) -> str | None:
    """None when stage `producer` is done for this recipe; else why not ('' = it has not finished)."""
    info = read_marker(ctx, producer)
    return "" if info is None else stale_reason(ctx, producer, info)


def _run_first(ctx: StageContext, what: str, producer: str, why: str, alternative: str = "") -> str:
    which = [why] if why else []
    if producer in ctx.recipe.stages:
        fix = f"run --stage {producer} first"
    else:
        which.append("this recipe does not run")
        fix = f"add {producer!r} to the recipe's stages{alternative}"
    made = f"made by stage {producer!r}" + (f", which {' and '.join(which)}" if which else "")
    return f"{what} ({made}); {fix}"


def _weights(ctx: StageContext, what: str, producer: str, path: Path, alternative: str = "") -> str | None:
    why = _not_done(ctx, producer)
    if why is not None:
        return _run_first(ctx, f"{what} {path}", producer, why, alternative)
    if path.is_file():
        return None
    return (f"{what} {path}, which is missing although stage {producer!r} finished; delete "
            f"{ctx.out / producer / 'done.json'} and run --stage {producer}")


def vae_weights(ctx: StageContext) -> str | None:
    return _weights(ctx, "the VAE", "vae", ctx.out / "vae" / "vae.safetensors")


def exported_vae(ctx: StageContext) -> str | None:
    """The VAE of the exported student folder: the fine-tuned decoder's when the recipe has one."""
    if "decoder" in ctx.recipe.stages:
        return _weights(ctx, "for its student folder the fine-tuned VAE", "decoder",
                        ctx.out / "decoder" / "vae.safetensors")
    path = ctx.out / "vae" / "vae.safetensors"
    if "vae" not in ctx.recipe.stages and (path.is_file() or ctx.recipe.teacher.checkpoint):
        return None  # the user's VAE there, or the teacher checkpoint's (`StageContext.load_vae`)
    return _weights(ctx, "for its student folder the VAE", "vae", path,
                    ", put your VAE's weights there, or set teacher.checkpoint (its VAE is used)")


def latent_set(ctx: StageContext) -> str | None:
    r = ctx.recipe
    directory, n = ctx.latents_dir, r.world.num_latent_clips
    reference = ctx.model_config().still_reference_latents > 0
    if r.world.latents:
        ready = latents_ready(directory, n, reference=reference, made_by=ANY_VAE)
        if ready == n:
            return None
        return (f"the latent set {directory} (world.latents), which holds {ready} of the {n} clips needed"
                + (" with still-reference latents" if reference else "")
                + "; encode them there in the shard format of livetalk_cli/distill/data.py")
    why = _not_done(ctx, "vae")
    if why is None:
        ready = latents_ready(directory, n, reference=reference, made_by=stage_id(ctx, "vae"))
        if ready == n:
            return None
        why = f"has encoded {ready} of the {n} clips needed with its VAE"
    return _run_first(ctx, f"the latent set {directory}", "vae", why)


def teacher(ctx: StageContext) -> str | None:
    checkpoint = ctx.recipe.teacher.checkpoint
    if checkpoint:
        return None if Path(checkpoint).exists() else f"the teacher {checkpoint} (teacher.checkpoint), not found"
    return _weights(ctx, "the teacher", "teacher", ctx.out / "teacher" / "dit.safetensors",
                    " or set teacher.checkpoint")


def trajectories(ctx: StageContext) -> str | None:
    n = ctx.recipe.trajectories.num_samples
    why = _not_done(ctx, "trajectories")
    if why is None:
        ready = trajectories_ready(ctx)
        if ready == n:
            return None
        why = f"holds {ready} of the {n} needed"
    return _run_first(ctx, f"the teacher trajectories {ctx.out / 'trajectories'}", "trajectories", why)


def ode_init_student(ctx: StageContext) -> str | None:
    return _weights(ctx, "the ODE-init student", "ode_init", ctx.out / "ode_init" / "dit.safetensors")


CHECKS: dict[str, Callable[[StageContext], str | None]] = {
    "vae": vae_weights, "latents": latent_set, "teacher": teacher, "trajectories": trajectories,
    "ode_init": ode_init_student,
}
