"""Run a recipe's stages in order (or one of them); each stage resumes from its own checkpoint."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable

import torch

from livetalk_cli.distill.context import ProgressHook, StageContext
from livetalk_cli.distill.inputs import check_inputs
from livetalk_cli.distill.recipe import Recipe, recipe_dict
from livetalk_cli.distill.trainer import init_ranks
from livetalk_cli.errors import UserError
from livetalk_cli.pipeline import resolve_device

log = logging.getLogger(__name__)


def _stage_fn(stage: str) -> Callable[[StageContext], None]:
    if stage == "vae":
        from livetalk_cli.distill.vae_stage import run_vae_stage

        return run_vae_stage
    if stage == "decoder":
        from livetalk_cli.distill.vae_stage import run_decoder_stage

        return run_decoder_stage
    if stage == "teacher":
        from livetalk_cli.distill.teacher_stage import run_teacher_stage

        return run_teacher_stage
    if stage == "trajectories":
        from livetalk_cli.distill.trajectories import run_trajectory_stage

        return run_trajectory_stage
    if stage == "ode_init":
        from livetalk_cli.distill.ode_init import run_ode_init_stage

        return run_ode_init_stage
    if stage == "dmd":
        from livetalk_cli.distill.dmd import run_dmd_stage

        return run_dmd_stage
    raise UserError(f"unknown stage {stage!r}")


def run_recipe(recipe: Recipe, *, stage: str | None = None, on_progress: ProgressHook | None = None) -> StageContext:
    """Run `stage`, or every stage of the recipe in order. Returns the context (for the caller's summary)."""
    if stage is not None and stage not in recipe.stages:
        raise UserError(f"stage {stage!r} is not in this recipe's stages {list(recipe.stages)}")
    device = resolve_device(recipe.device)
    ranks = init_ranks(device)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ and ranks.world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks.world))
    ctx = StageContext(recipe, ranks, on_progress)
    if ranks.main:
        recipe.out.mkdir(parents=True, exist_ok=True)
        (recipe.out / "recipe.json").write_text(json.dumps(recipe_dict(recipe), indent=1, default=str))
        if recipe.max_steps is not None:
            log.warning("%s", smoke_note(recipe))
    for name in [stage] if stage else recipe.stages:
        log.info("stage %s", name)
        check_inputs(ctx, name)  # before any work: a missing input is one line naming the stage to run
        _stage_fn(name)(ctx)
        if name in STUDENT_FOLDERS:
            export_student(ctx, name, STUDENT_FOLDERS[name])
        ranks.barrier()  # every rank sees the stage's outputs before the next stage starts
    return ctx


def smoke_note(r: Recipe) -> str:
    """What a `--max-steps` run bounds (also in OUT/recipe.json: max_steps, world.latent_clips,
    trajectories.num_samples)."""
    return (f"--max-steps {r.max_steps}: a smoke run: {r.max_steps} steps per training stage, "
            f"{r.world.num_latent_clips} of {r.world.train_clips} clips encoded, "
            f"{r.trajectories.num_samples} teacher trajectories; a later run without --max-steps in "
            f"{r.out} makes again whatever falls short of the recipe")


# Stages whose DiT is a student, and the checkpoint folder each is exported to.
STUDENT_FOLDERS = {"ode_init": "student_ode_init", "dmd": "student"}


def export_student(ctx: StageContext, stage: str, dest: str) -> None:
    """Write a `livetalk render --checkpoint` folder for the DiT a stage produced."""
    from livetalk_cli.checkpoint import save_checkpoint

    if not ctx.ranks.main:
        return
    save_checkpoint(ctx.out / dest, ctx.model_config(),
                    {"dit": ctx.load_dit(stage), "vae": ctx.load_vae(), "text_encoder": ctx.text_encoder()})
