"""`livetalk distill`: a stage's missing inputs are one line naming the stage to run first;
`--max-steps` bounds the data a smoke run prepares, and a later full run completes it (CPU,
single-threaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from livetalk_cli.cli import app
from livetalk_cli.distill.context import StageContext
from livetalk_cli.distill.recipe import STAGES, load_recipe
from livetalk_cli.distill.run import run_recipe
from livetalk_cli.distill.trainer import Ranks, read_log
from livetalk_cli.errors import UserError
from tests.distill_helpers import seed_run_folder, write_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()


# --- 4b. missing inputs, --max-steps -------------------------------------------------------


MISSING_INPUTS = [  # (stage, outputs of tiny_run copied in, the stage to run first, recipe changes, in message)
    ("decoder", (), "vae", {}, "the VAE"),
    ("teacher", (), "vae", {}, "the latent set"),  # a fresh run folder
    ("teacher", ("vae",), "vae", {}, "has encoded 0 of the 4 clips"),
    ("teacher", ("vae", "latents"), "vae", {"world": {"train_clips": 8}}, "has encoded 0 of the 8 clips"),
    ("trajectories", ("vae", "latents"), "teacher", {}, "the teacher"),
    ("trajectories", ("vae", "teacher"), "vae", {}, "the latent set"),
    ("trajectories", ("vae", "latents", "teacher"), "teacher", {"teacher": {"steps": 5}},
     "ran 2 of the recipe's 5 steps"),  # a shorter (--max-steps) teacher is no input for the full recipe
    ("ode_init", ("vae", "decoder", "latents", "trajectories"), "teacher", {}, "the teacher"),
    ("ode_init", ("vae", "decoder", "latents", "teacher"), "trajectories", {}, "the teacher trajectories"),
    ("ode_init", ("vae", "decoder", "teacher", "trajectories"), "vae", {}, "the latent set"),
    ("dmd", ("vae", "decoder", "latents", "teacher"), "ode_init", {}, "the ODE-init student"),
    ("dmd", ("vae", "latents", "ode_init"), "teacher", {}, "the teacher"),
    ("dmd", ("vae", "latents", "teacher", "ode_init"), "decoder", {}, "the fine-tuned VAE"),  # the export's
]


@pytest.mark.parametrize(("stage", "parts", "producer", "changes", "named"), MISSING_INPUTS)
def test_a_missing_input_is_one_line_naming_the_stage_to_run_first(tiny_run, tmp_path, stage, parts, producer,
                                                                   changes, named):

    _, src = tiny_run
    out = seed_run_folder(src, tmp_path / "run", *parts)
    with pytest.raises(UserError) as e:
        run_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", **changes), out=out), stage=stage)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"stage {stage!r} needs "), message
    assert named in message and message.endswith(f"run --stage {producer} first"), message
    assert str(out) in message  # the path of what is missing
    assert not (out / stage).exists()  # checked before the stage started anything


def shard_indices(directory: Path) -> list[list[int]]:
    return [load_file(str(p))["index"].tolist() for p in sorted(directory.glob("shard_*.safetensors"))]


def test_max_steps_bounds_the_latent_set_and_a_full_run_completes_it(tmp_path, monkeypatch):
    """--max-steps encodes only the clips its steps can use (whole shards); a later run without it
    in the same folder extends (same VAE) or re-encodes (VAE retrained) the set to the full count,
    and retrains the teacher from scratch: the folder ends exactly as a full run alone leaves it."""
    from livetalk_cli.distill import data
    from livetalk_cli.distill.data import latents_complete, load_latents
    from livetalk_cli.distill.markers import stage_id

    monkeypatch.setattr(data, "SHARD", 4)  # 10 clips = shards of 4, 4, 2
    path = write_recipe(tmp_path / "r.yaml", world={"train_clips": 10})
    fresh = tmp_path / "fresh"
    for stage in ("vae", "teacher"):
        run_recipe(load_recipe(path, out=fresh), stage=stage)
    reference = load_latents(fresh / "latents", 10)
    teacher = load_file(str(fresh / "teacher" / "dit.safetensors"))

    for smoke_steps in (1, 2):  # tiny's VAE trains 2 steps: with 2 the smoke run's VAE is the full one
        out = tmp_path / f"smoke{smoke_steps}"
        smoke = load_recipe(path, out=out, max_steps=smoke_steps)
        # teacher and dmd draw steps x 2 clips, ode_init steps x 2 trajectories: up to whole shards
        assert (smoke.world.latent_clips, smoke.trajectories.num_samples) == (4, 2)
        for stage in ("vae", "teacher"):
            run_recipe(smoke, stage=stage)
        assert shard_indices(out / "latents") == [[0, 1, 2, 3]]
        saved = json.loads((out / "recipe.json").read_text())
        assert saved["max_steps"] == smoke_steps and saved["world"]["latent_clips"] == 4
        assert json.loads((out / "teacher" / "done.json").read_text())["clips"] == 4
        first = (out / "latents" / "shard_00000.safetensors").stat().st_mtime_ns

        full = load_recipe(path, out=out)
        for stage in ("vae", "teacher"):
            run_recipe(full, stage=stage)
        assert shard_indices(out / "latents") == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
        assert latents_complete(out / "latents", 10, reference=True, made_by=stage_id(
            StageContext(full, Ranks(0, 1, torch.device("cpu"))), "vae"))
        kept = (out / "latents" / "shard_00000.safetensors").stat().st_mtime_ns == first
        assert kept == (smoke_steps == 2), smoke_steps  # extended with the same VAE, else encoded again
        again = load_latents(out / "latents", 10)
        assert torch.equal(again.latents, reference.latents) and torch.equal(again.reference, reference.reference)
        assert [rec["step"] for rec in read_log(out / "teacher" / "log.jsonl")] == [1, 2]
        weights = load_file(str(out / "teacher" / "dit.safetensors"))
        assert all(torch.equal(weights[k], teacher[k]) for k in teacher), smoke_steps


def test_a_full_run_after_a_max_steps_run_ends_as_a_full_run_alone(tiny_run, tmp_path):
    """Every stage of the smoke run falls short of the recipe, so the full run makes all of them
    again (none resumed from, or fed by, the smoke run's outputs): the same weights as `tiny_run`."""
    recipe, src = tiny_run
    out = tmp_path / "run"
    for flags in (["--max-steps", "1"], []):
        res = runner.invoke(app, ["distill", str(recipe), "--out", str(out), *flags])
        assert res.exit_code == 0, (res.output, res.exception)
        if flags:
            assert "--max-steps 1: a smoke run" in res.output
            assert json.loads((out / "dmd" / "done.json").read_text())["max_steps"] == 1
    for stage in STAGES:
        done = json.loads((out / stage / "done.json").read_text())
        assert done["max_steps"] is None, stage
    for f in ("vae/vae.safetensors", "decoder/vae.safetensors", "teacher/dit.safetensors",
              "trajectories/shard_00000.safetensors", "ode_init/dit.safetensors", "student/dit.safetensors"):
        a, b = load_file(str(src / f)), load_file(str(out / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


def test_a_latent_shard_with_fewer_clips_is_encoded_again(tmp_path):
    from livetalk_cli.config import preset
    from livetalk_cli.distill.data import encode_world, latents_ready, load_latents
    from livetalk_cli.models.audio import build_audio_encoder
    from livetalk_cli.models.vae import WanVAE

    torch.manual_seed(0)
    cfg = preset("tiny").replace(still_reference_latents=0)
    vae = WanVAE(cfg.vae).eval()
    enc = build_audio_encoder(cfg, model_dir=None, random_weights=False, device="cpu")
    encode_world(tmp_path, cfg, vae, enc, num_clips=2, clip_frames=9, made_by="a")
    assert latents_ready(tmp_path, 2, made_by="a") == 2 and latents_ready(tmp_path, 3, made_by="a") == 0
    assert latents_ready(tmp_path, 2) == 0 and latents_ready(tmp_path, 2, made_by="b") == 0  # another VAE's
    two = load_latents(tmp_path, 2)
    encode_world(tmp_path, cfg, vae, enc, num_clips=3, clip_frames=9, made_by="a")
    assert shard_indices(tmp_path) == [[0, 1, 2]] and latents_ready(tmp_path, 3, made_by="a") == 3
    three = load_latents(tmp_path, 3)
    assert torch.equal(three.latents[:2], two.latents) and three.prompts[:2] == two.prompts
    assert len(load_latents(tmp_path, 1)) == 1  # a set may hold more clips than asked for
