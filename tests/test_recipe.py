"""Distillation recipes: the shipped ones validate (the real scale builds on meta), bad ones fail
with one line naming the key; and the trainer's small pieces (plateau, schedules, seeds, accumulation)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from livetalk_cli.cli import app
from livetalk_cli.distill.context import stage_modules
from livetalk_cli.distill.ode_init import plateau_update
from livetalk_cli.distill.recipe import STAGES, TRAINING_STAGES, OptimConfig, load_recipe, parse_recipe, recipe_dict
from livetalk_cli.distill.trainer import Ranks, accumulate, generator, lr_at, sample_seed
from livetalk_cli.errors import UserError
from livetalk_cli.sampling.schedule import sampling_sigmas
from tests.distill_helpers import set_key, tiny_data, write_recipe

ROOT = Path(__file__).resolve().parent.parent

runner = CliRunner()
WAN_1_3B_PARAMS = 1_421_187_232  # Wan2.1-1.3B + OmniAvatar's audio/reference conditioning


# --- 1. the shipped recipes ---------------------------------------------------------------


def test_shipped_recipes_validate_and_build_at_real_scale():
    demo = load_recipe(ROOT / "recipes" / "demo")
    assert demo.stages == STAGES and demo.model.name == "demo"
    assert set(stage_modules(demo, "meta")) == set(STAGES)
    # the sinks study's model: the demo's recipe but for the reference at latent frame 0 only
    first = load_recipe(ROOT / "recipes" / "demo-first-reference")
    assert first.model.dit.reference_positions == "first" and demo.model.dit.reference_positions == "every"
    assert dataclasses.replace(first.model, dit=demo.model.dit) == demo.model
    assert (first.teacher, first.dmd, first.ode_init) == (demo.teacher, demo.dmd, demo.ode_init)

    real = load_recipe(ROOT / "recipes" / "omniavatar-1.3b")
    assert real.model.name == "omniavatar-1.3b"
    modules = stage_modules(real, "meta")
    assert set(modules) == {"trajectories", "ode_init", "dmd"}
    assert set(modules["dmd"]) == {"generator", "critic", "real"}
    for stage, models in modules.items():
        for name, module in models.items():
            params = list(module.parameters())
            assert all(p.is_meta for p in params), (stage, name)
            assert sum(p.numel() for p in params) == WAN_1_3B_PARAMS, (stage, name)

    # LiveTalk's settings (REFERENCE §5)
    s, d = real.model.stream, real.dmd
    assert (s.block_frames, s.num_steps, s.shift) == (3, 4, 5.0)
    assert d.gen_optim.lr == 4e-6 and d.critic_optim.lr == 8e-7
    assert d.gen_optim.betas == d.critic_optim.betas == (0.0, 0.999)
    assert d.gen_optim.grad_clip == d.critic_optim.grad_clip == 10.0
    assert d.guidance == real.trajectories.guidance == 6.0
    assert (d.ema_decay, d.ema_start) == (0.99, 200)
    assert (d.critic_warmup, d.critic_per_gen) == (20, 5)
    assert (d.timestep_min, d.timestep_max, d.timestep_shift) == (20.0, 980.0, 5.0)
    assert d.num_blocks * s.block_frames == 1 + (real.world.clip_frames - 1) // 4 == 21
    assert (real.dtype, real.parallel) == ("bfloat16", "fsdp")
    # the kept teacher steps sit exactly on the 4-step student's timesteps
    t = real.trajectories
    teacher_sig = sampling_sigmas(t.num_steps, t.shift)[list(t.keep_steps[:-1])]
    assert torch.allclose(teacher_sig, sampling_sigmas(s.num_steps, s.shift), rtol=0, atol=1e-12)
    assert t.keep_steps[-1] == t.num_steps


# --- 2. recipe errors ---------------------------------------------------------------------

@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("bogus", 1, ["bogus"]),
        ("teacher.stepz", 3, ["teacher", "stepz"]),
        ("teacher.optim.lrr", 1e-4, ["teacher.optim", "lrr"]),
        ("world.heldout", 5, ["world", "heldout"]),
        ("model_overrides.dit.dimm", 3, ["dimm"]),
        ("teacher.steps", "many", ["teacher.steps", "int"]),
        ("teacher.steps", True, ["teacher.steps"]),
        ("teacher.steps", 2.5, ["teacher.steps"]),
        ("teacher", [1], ["teacher", "mapping"]),
        ("teacher.optim.betas", [0.9], ["teacher.optim.betas"]),
        ("teacher.optim.lr", -1e-4, ["teacher.optim.lr"]),
        ("dmd.gen_optim.lr", "-4e-6", ["dmd.gen_optim.lr"]),  # YAML reads -4e-6 as a string
        ("teacher.optim.schedule", "linear", ["teacher.optim.schedule"]),
        ("world.clip_frames", 44, ["world.clip_frames"]),
        ("vae.clip_frames", 4, ["vae.clip_frames"]),
        ("stages", ["foo"], ["stages", "foo"]),
        ("stages", "vae", ["stages"]),
        ("trajectories.keep_steps", [0, 2, 4], ["trajectories", "student"]),
        ("trajectories.keep_steps", [0, 1, 2, 3, 5], ["trajectories.keep_steps"]),
        ("dtype", "fp8", ["dtype", "fp8"]),
        ("vae.grad_accum", 3, ["vae.batch_size"]),
        ("teacher.drop_text", 1.0, ["teacher.drop_text"]),
        ("dmd.ema_decay", 1.0, ["dmd", "ema_decay"]),
        ("dmd.timestep_min", 990, ["dmd", "timestep_min"]),
        ("dmd.num_blocks", 3, ["dmd.num_blocks"]),
        ("dmd.num_blocks", 0, ["dmd.num_blocks"]),
        ("trajectories.num_samples", 8, ["trajectories.num_samples"]),
        ("trajectories.shift", 3.0, ["trajectories"]),
    ],
)
def test_recipe_errors_are_one_user_error_naming_the_key(key, value, named):
    with pytest.raises(UserError) as e:
        parse_recipe(set_key(tiny_data(), key, value))
    message = str(e.value)
    assert "\n" not in message
    for part in named:
        assert part in message, message


def test_recipe_rejects_kept_steps_off_the_student_schedule():
    data = tiny_data(trajectories={"num_steps": 48, "keep_steps": [0, 1, 2, 3, 48]})
    with pytest.raises(UserError, match="keep_steps"):
        parse_recipe(data)


def test_the_tiny_recipe_and_cli_overrides(tmp_path):
    r = load_recipe(write_recipe(tmp_path / "r.yaml"), out=tmp_path / "o", max_steps=7)
    assert r.out == tmp_path / "o" and r.stages == STAGES
    assert (r.vae.steps, r.teacher.steps, r.ode_init.steps, r.dmd.steps) == (7, 7, 7, 7)
    assert r.teacher.optim.lr == 3e-4 and r.dmd.gen_optim.betas == (0.0, 0.999)  # stage defaults
    assert r.trajectories.keep_steps == (0, 1, 2, 3, 4)
    with pytest.raises(UserError, match="max-steps"):
        load_recipe(tmp_path / "r.yaml", max_steps=-1)
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(UserError, match="mapping"):
        load_recipe(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("teacher: {steps: [\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_recipe(tmp_path / "broken.yaml")


def _one_line_error(res) -> str:  # noqa: ANN001 - click Result
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)  # typer.Exit(2), not a crash
    lines = res.output.strip().splitlines()
    assert len(lines) == 1, res.output
    assert lines[0].startswith("error:")
    return lines[0]


def test_cli_recipe_errors_exit_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(set_key(tiny_data(), "teacher.stepz", 3)))
    line = _one_line_error(runner.invoke(app, ["distill", str(bad), "--out", str(tmp_path / "o")]))
    assert "teacher" in line and "stepz" in line
    line = _one_line_error(runner.invoke(app, ["distill", str(tmp_path / "missing.yaml")]))
    assert "missing.yaml" in line and "not found" in line
    good = write_recipe(tmp_path / "good.yaml")
    line = _one_line_error(runner.invoke(app, ["distill", str(good), "--stage", "foo", "--out", str(tmp_path / "o")]))
    assert "foo" in line
    assert not (tmp_path / "o").exists()  # nothing was started


def test_cli_missing_stage_input_exits_2_with_one_line(tmp_path):
    """`--stage teacher` on a fresh run folder: one line naming the stage to run first, no traceback."""
    out = tmp_path / "fresh"
    res = runner.invoke(app, ["distill", str(write_recipe(tmp_path / "r.yaml")), "--stage", "teacher",
                              "--out", str(out)])
    line = _one_line_error(res)
    assert "Traceback" not in res.stderr and res.stderr.strip() == line
    assert line.startswith("error: stage 'teacher' needs the latent set")
    assert str(out / "latents") in line and line.endswith("run --stage vae first")
    assert not (out / "teacher").exists()


def test_max_steps_bounds_the_data_stages_prepare():
    full = load_recipe(ROOT / "recipes" / "demo")
    assert (full.max_steps, full.world.num_latent_clips, full.trajectories.num_samples) == (None, 1024, 128)
    smoke = load_recipe(ROOT / "recipes" / "demo", max_steps=2)
    assert all(getattr(smoke, s).steps == 2 for s in TRAINING_STAGES) and smoke.max_steps == 2
    # teacher 2 x 8 clips, dmd 2 x 4, trajectories 2 x 8 (ode_init): one shard of 64 clips, one of 16 samples
    assert (smoke.world.latent_clips, smoke.world.train_clips, smoke.trajectories.num_samples) == (64, 1024, 16)
    assert smoke.trajectories.num_steps == full.trajectories.num_steps  # the recipe's sampler, fewer samples
    zero = load_recipe(ROOT / "recipes" / "demo", max_steps=0)  # still one batch
    assert (zero.world.latent_clips, zero.trajectories.num_samples) == (64, 16)
    many = load_recipe(ROOT / "recipes" / "demo", max_steps=200)  # 1600 draws: the whole set
    assert (many.world.num_latent_clips, many.trajectories.num_samples) == (1024, 128)
    assert recipe_dict(smoke)["world"]["latent_clips"] == 64 and recipe_dict(smoke)["max_steps"] == 2
    with pytest.raises(UserError, match="max_steps"):
        parse_recipe({**tiny_data(), "max_steps": 2})  # the flag, not a recipe key
    with pytest.raises(UserError, match="world.latent_clips"):
        parse_recipe(set_key(tiny_data(), "world.latent_clips", 5))  # more than train_clips


# --- 6. units -----------------------------------------------------------------------------


def test_plateau_update_records_the_first_flat_window():
    extra: dict = {}
    # windows of 2 steps: means 10, 8 (-20 %), 7.9 (-1.25 % < 2 %: plateau), 7 (-11 %)
    for step, loss in enumerate([10, 10, 8, 8, 8.0, 7.8, 7, 7]):
        plateau_update(extra, step, loss, window=2, tol=0.02)
        if step == 3:
            assert extra.get("plateau_step") is None
        if step == 5:
            assert extra["plateau_step"] == 6
    assert extra["windows"] == pytest.approx([10, 8, 7.9, 7])
    assert extra["plateau_step"] == 6  # the first plateau is kept
    assert extra["n"] == 0 and extra["sum"] == 0
    # a loss that goes up has plateaued too; a half-filled window is not judged
    extra = {}
    for step, loss in enumerate([5, 6, 1]):
        plateau_update(extra, step, loss, window=1, tol=0.0)
    assert extra["plateau_step"] == 2 and extra["windows"] == [5, 6, 1]
    extra = {}
    for step, loss in enumerate([5, 5, 5]):
        plateau_update(extra, step, loss, window=2, tol=0.5)
    assert "plateau_step" not in extra and extra["windows"] == [5] and extra["n"] == 1


def test_lr_schedules():
    const = OptimConfig(lr=1e-3)
    assert [lr_at(const, s, 10) for s in (0, 5, 9)] == [1e-3] * 3

    warm = OptimConfig(lr=1e-3, warmup_steps=4)
    assert [lr_at(warm, s, 10) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])

    cos = OptimConfig(lr=1e-3, schedule="cosine", warmup_steps=2, min_lr_ratio=0.1)
    assert lr_at(cos, 0, 12) == pytest.approx(5e-4)
    assert lr_at(cos, 2, 12) == pytest.approx(1e-3)  # the peak right after warm-up
    assert lr_at(cos, 7, 12) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half way
    assert lr_at(cos, 12, 12) == pytest.approx(1e-4) == lr_at(cos, 50, 12)  # the floor
    values = [lr_at(cos, s, 12) for s in range(2, 13)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))

    agg = OptimConfig(lr=4e-6, schedule="aggressive", boost=2.0, boost_steps=3)
    assert [lr_at(agg, s, 10) for s in range(5)] == pytest.approx([8e-6, 8e-6, 8e-6, 4e-6, 4e-6])


def test_sample_seeds_do_not_depend_on_ranks():
    a = sample_seed(0, "dmd", 7, 3)
    assert a == sample_seed(0, "dmd", 7, 3) and 0 <= a < 2**63
    assert len({sample_seed(0, "dmd", 7, i) for i in range(64)}) == 64
    others = {sample_seed(1, "dmd", 7, 3), sample_seed(0, "teacher", 7, 3), sample_seed(0, "dmd", 8, 3),
              sample_seed(0, "dmd", 7, 3, "critic")}
    assert a not in others and len(others) == 4
    assert torch.equal(torch.randn(5, generator=generator(0, "dmd", 7, 3)),
                       torch.randn(5, generator=generator(0, "dmd", 7, 3)))
    # each rank owns a contiguous slice; together they are the global batch, once
    shards = [Ranks(r, 4, torch.device("cpu")).shard(8) for r in range(4)]
    assert [list(s) for s in shards] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert list(Ranks(0, 1, torch.device("cpu")).shard(8)) == list(range(8))
    with pytest.raises(ValueError):
        Ranks(0, 3, torch.device("cpu")).shard(8)


def test_accumulate_equals_one_big_batch():
    torch.manual_seed(0)
    x, y = torch.randn(6, 5), torch.randn(6, 3)
    grads, logs = [], []
    for accum in (1, 2, 3):
        model = torch.nn.Linear(5, 3)
        torch.nn.init.constant_(model.weight, 0.1)
        torch.nn.init.zeros_(model.bias)

        def loss_fn(chunk: list[int], model: torch.nn.Module = model) -> tuple[torch.Tensor, dict[str, float]]:
            loss = (model(x[chunk]) - y[chunk]).square().mean()
            return loss, {"loss": loss.item()}

        logs.append(accumulate(model, range(6), accum, loss_fn))
        grads.append(torch.cat([model.weight.grad.flatten(), model.bias.grad]))
    for g, log in zip(grads[1:], logs[1:], strict=True):
        assert torch.allclose(g, grads[0], atol=1e-6)
        assert log["loss"] == pytest.approx(logs[0]["loss"], rel=1e-6)


