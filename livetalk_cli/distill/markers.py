"""Stage markers: when a stage's outputs are finished for this recipe, and what they were made from.

`OUT/<stage>/done.json` says a stage finished. It records a new `id` each time, the sizes the
stage ran with (`steps`; `clips`, the latent set's size, for teacher and dmd; `num_samples` for
trajectories), `max_steps` (the `--max-steps` of a smoke run, else null) and `inputs`: the ids of
the outputs it was made from (`INPUTS`: the VAE behind the latent set, the teacher, the
trajectories, the ODE-init student). A stage counts as done while the recipe asks for no more than
it ran and no input it was made from has been made again since (a deleted input does not count):
after a `--max-steps` run, a full run in the same folder makes again every stage that fell short
(and all that depend on it), while a `--max-steps` run on a finished run reuses that run.
Markers from before these fields existed are taken as they are.

A stage's checkpoint records its inputs and `max_steps` too (`checkpoint_meta`); one made from
other inputs or under another `--max-steps` is not resumed (`checkpoint_matches`): the stage starts
again from step 0, so a smoke run's 2 steps never become the first 2 steps of a full run.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from livetalk_cli.files import atomic_path

if TYPE_CHECKING:
    from livetalk_cli.distill.context import StageContext

log = logging.getLogger(__name__)

# What each stage's outputs are made from (besides the recipe). `latents` is the latent set, whose
# id is the id of the VAE that encoded it (its shards carry that id, `data.encode_world`).
INPUTS: dict[str, tuple[str, ...]] = {
    "vae": (),
    "decoder": ("vae",),
    "teacher": ("latents",),
    "trajectories": ("latents", "teacher"),
    "ode_init": ("latents", "teacher", "trajectories"),
    "dmd": ("latents", "teacher", "ode_init"),
}
LABELS = {"vae": "VAE", "latents": "latent set", "teacher": "teacher", "trajectories": "set of trajectories",
          "ode_init": "ODE-init student"}
SIZE_WORDS = {"steps": "steps", "clips": "clips", "num_samples": "trajectories"}


def read_marker(ctx: StageContext, stage: str) -> dict[str, Any] | None:
    path = ctx.out / stage / "done.json"
    return json.loads(path.read_text()) if path.is_file() else None


def stage_id(ctx: StageContext, stage: str) -> str | None:
    """The id of the stage's finished outputs (None: not finished, or marked before ids existed)."""
    info = read_marker(ctx, stage)
    return info.get("id") if info else None


def input_id(ctx: StageContext, name: str) -> str | None:
    r = ctx.recipe
    if name == "latents":
        return None if r.world.latents else stage_id(ctx, "vae")
    if name == "teacher" and r.teacher.checkpoint:
        return f"checkpoint:{r.teacher.checkpoint}"
    return stage_id(ctx, name)


def made_from(ctx: StageContext, stage: str) -> dict[str, str | None]:
    """The ids of the inputs `stage` is made from now."""
    return {name: input_id(ctx, name) for name in INPUTS[stage]}


def sizes(ctx: StageContext, stage: str) -> dict[str, int]:
    """What the recipe asks of `stage`: a finished stage must have run at least this much."""
    r = ctx.recipe
    if stage == "trajectories":
        return {"num_samples": r.trajectories.num_samples}
    wanted = {"steps": getattr(r, stage).steps}
    if stage in ("teacher", "dmd"):
        wanted["clips"] = r.world.num_latent_clips
    return wanted


def stale_reason(ctx: StageContext, stage: str, info: dict[str, Any]) -> str | None:
    """Why the finished outputs `info` describes do not serve this recipe now (None: they do)."""
    for key, want in sizes(ctx, stage).items():
        have = info.get(key)
        if isinstance(have, int) and have < want:
            return f"ran {have} of the recipe's {want} {SIZE_WORDS[key]}"
    inputs = info.get("inputs")
    if isinstance(inputs, dict):
        for name, now in made_from(ctx, stage).items():
            if now is not None and name in inputs and inputs[name] != now:  # (a deleted input: None)
                return f"was made from another {LABELS[name]}"
    return None


def stage_done(ctx: StageContext, stage: str) -> bool:
    info = read_marker(ctx, stage)
    return info is not None and stale_reason(ctx, stage, info) is None


def mark_done(ctx: StageContext, stage: str, info: dict[str, Any]) -> None:
    """Write `stage`'s marker (rank 0): `info` with its sizes, inputs, max_steps and a new id."""
    if ctx.ranks.main:
        record = {**sizes(ctx, stage), **info, "max_steps": ctx.recipe.max_steps,
                  "inputs": made_from(ctx, stage), "id": uuid.uuid4().hex}
        marker = ctx.out / stage / "done.json"
        marker.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(marker) as tmp:
            tmp.write_text(json.dumps(record, indent=1))


def checkpoint_meta(ctx: StageContext, stage: str) -> dict[str, Any]:
    """What a stage's checkpoint records about how it was made (`run_loop`'s `meta`)."""
    fingerprint: dict[str, Any] = {"inputs": made_from(ctx, stage), "max_steps": ctx.recipe.max_steps}
    if stage in ("teacher", "dmd"):
        fingerprint["clips"] = ctx.recipe.world.num_latent_clips
    return {"stage": stage, "fingerprint": fingerprint}


def checkpoint_matches(directory: Path, meta: dict[str, Any]) -> bool:
    """False when `directory` holds a checkpoint made from other inputs than `meta` says (a stale
    one: the stage starts again); True otherwise, also with no checkpoint or one from before
    fingerprints existed."""
    path = directory / "checkpoint.json"
    want = meta.get("fingerprint")
    if want is None or not path.is_file():
        return True
    have = json.loads(path.read_text()).get("fingerprint")
    if have is None or have == json.loads(json.dumps(want)):
        return True
    log.warning("%s: its checkpoint was made from other inputs or another --max-steps (%s; now %s): "
                "starting the stage again", directory, have, want)
    return False
