"""`livetalk distill`: typed recipes, every stage end to end, exact resume, multi-process parity (CPU).

Everything here runs single-threaded (torch and the torchrun children): on a small, busy machine
oversubscribed BLAS threads make the tiny stages ~10x slower, and one thread is deterministic.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from livetalk_cli.cli import app
from livetalk_cli.distill.context import stage_modules
from livetalk_cli.distill.ode_init import plateau_update
from livetalk_cli.distill.recipe import STAGES, OptimConfig, load_recipe, parse_recipe
from livetalk_cli.distill.run import run_recipe
from livetalk_cli.distill.trainer import Ranks, accumulate, generator, lr_at, read_log, sample_seed
from livetalk_cli.errors import UserError
from livetalk_cli.pipeline import load_model
from livetalk_cli.sampling.schedule import sampling_sigmas

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
WAN_1_3B_PARAMS = 1_421_187_232  # Wan2.1-1.3B + OmniAvatar's audio/reference conditioning

# Every stage in ~10 s on one CPU thread: 4 clips of 21 frames (6 latent frames = 2 blocks).
TINY = """\
name: tiny-test
model: tiny
seed: 0
device: cpu
world: {train_clips: 4, clip_frames: 21}
vae: {steps: 2, batch_size: 2, clip_frames: 5, stats_clips: 2, log_every: 1}
teacher: {steps: 2, batch_size: 2, log_every: 1}
trajectories: {num_samples: 2, num_steps: 4, keep_steps: [0, 1, 2, 3, 4], shard_size: 2, batch_size: 2}
ode_init: {steps: 2, batch_size: 2, log_every: 1, plateau_window: 1}
dmd: {steps: 3, batch_size: 2, num_blocks: 2, critic_warmup: 1, critic_per_gen: 2, ema_start: 1, log_every: 1}
"""
UNTIMED = ("time", "samples_per_s")  # log fields that legitimately differ between runs


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_data(**sections: dict) -> dict:
    """The tiny recipe as data, with `sections` merged into its stage sections."""
    data = yaml.safe_load(TINY)
    for name, changes in sections.items():
        data[name] = {**data.get(name, {}), **changes}
    return data


def write_recipe(path: Path, **sections: dict) -> Path:
    path.write_text(yaml.safe_dump(tiny_data(**sections)))
    return path


def set_key(data: dict, key: str, value: object) -> dict:
    """data with the dotted `key` set (intermediate mappings created)."""
    data = copy.deepcopy(data)
    *parents, last = key.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return data


def losses(path: Path) -> list[dict]:
    return [{k: v for k, v in rec.items() if k not in UNTIMED} for rec in read_log(path)]


def flat(tensors: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
    return torch.cat([tensors[k].double().flatten() for k in sorted(tensors) if k.startswith(prefix)])


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


def seed_run_folder(src: Path, dst: Path, *parts: str) -> Path:
    """A run folder holding copies of earlier stages' outputs (to start a later stage directly)."""
    dst.mkdir(parents=True)
    for p in parts:
        shutil.copytree(src / p, dst / p)
    return dst


# --- 1. the shipped recipes ---------------------------------------------------------------


def test_shipped_recipes_validate_and_build_at_real_scale():
    demo = load_recipe(ROOT / "recipes" / "demo")
    assert demo.stages == STAGES and demo.model.name == "demo"
    assert set(stage_modules(demo, "meta")) == set(STAGES)

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


# --- 3. every stage end to end ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, _one_thread) -> tuple[Path, Path]:
    """`livetalk distill TINY --out RUN` (every stage); (recipe, run folder)."""
    root = tmp_path_factory.mktemp("distill")
    recipe = root / "recipe.yaml"
    recipe.write_text(TINY)
    out = root / "run"
    res = runner.invoke(app, ["distill", str(recipe), "--out", str(out)])
    assert res.exit_code == 0, (res.output, res.exception)
    return recipe, out


def test_every_stage_end_to_end(tiny_run):
    recipe_path, out = tiny_run
    r = load_recipe(recipe_path, out=out)
    for stage in STAGES:
        assert (out / stage / "done.json").is_file(), stage
    assert json.loads((out / "recipe.json").read_text())["name"] == "tiny-test"

    # trajectories: (samples, kept steps, C, F, h, w), the noise end first
    traj = load_file(str(out / "trajectories" / "shard_00000.safetensors"))
    assert traj["latents"].shape == (2, 5, 4, 6, 8, 8) and traj["index"].tolist() == [0, 1]
    assert torch.isfinite(traj["latents"].float()).all()

    # the exported students load as render checkpoints and hold the stages' weights
    stats = json.loads((out / "vae" / "latent_stats.json").read_text())
    students = {}
    for folder, stage in (("student", "dmd"), ("student_ode_init", "ode_init")):
        model = load_model(checkpoint=out / folder, device="cpu", dtype="float32")
        assert model.cfg.name == "tiny"
        assert model.cfg.vae.latent_mean == pytest.approx(stats["mean"])
        assert model.cfg.vae.latent_std == pytest.approx(stats["std"])
        trained = load_file(str(out / stage / "dit.safetensors"))
        sd = model.dit.state_dict()
        assert trained.keys() == sd.keys()
        assert all(torch.equal(sd[k].float(), trained[k].float()) for k in trained), folder
        vae = load_file(str(out / "vae" / "vae.safetensors"))
        assert all(torch.equal(model.vae.state_dict()[k].float(), v.float()) for k, v in vae.items())
        students[folder] = sd
    # the generator step moved the DMD student away from its ODE initialisation
    assert any(not torch.equal(students["student"][k], students["student_ode_init"][k]) for k in students["student"])

    # DMD: critic every step, the generator after the warm-up and then every critic_per_gen-th step
    d = r.dmd
    log = read_log(out / "dmd" / "log.jsonl")
    assert [rec["step"] for rec in log] == list(range(1, d.steps + 1))
    expected_gen = [s + 1 for s in range(d.steps)
                    if s >= d.critic_warmup and (s - d.critic_warmup) % d.critic_per_gen == 0]
    assert expected_gen == [2]
    assert [rec["step"] for rec in log if "dmd_loss" in rec] == expected_gen
    assert all("gen_lr" in rec for rec in log if "dmd_loss" in rec)
    assert all("critic_loss" in rec and rec["critic_lr"] == d.critic_optim.lr for rec in log)
    assert json.loads((out / "dmd" / "done.json").read_text())["ema"] is True  # ema_start 1 < 3 steps

    # every logged number of every training stage is finite, and the losses are there
    for stage, key in (("vae", "l1"), ("teacher", "loss"), ("ode_init", "loss"), ("dmd", "critic_loss")):
        records = read_log(out / stage / "log.jsonl")
        assert len(records) == getattr(r, stage).steps and all(key in rec for rec in records), stage
        for rec in records:
            for k, v in rec.items():
                if k != "stage":
                    assert math.isfinite(v), (stage, rec)


# --- 4. exact resume ----------------------------------------------------------------------


class Interrupt(Exception):
    pass


def test_teacher_resume_replays_exactly(tiny_run, tmp_path):
    _, src = tiny_run
    path = write_recipe(tmp_path / "r.yaml", teacher={"steps": 4, "ckpt_every": 2, "log_every": 1})
    a = seed_run_folder(src, tmp_path / "a", "vae", "latents")
    b = seed_run_folder(src, tmp_path / "b", "vae", "latents")
    run_recipe(load_recipe(path, out=a), stage="teacher")

    def stop_at_3(stage: str, done: int, total: int, values: dict) -> None:
        if stage == "teacher" and done == 3:
            raise Interrupt

    rb = load_recipe(path, out=b)
    with pytest.raises(Interrupt):
        run_recipe(rb, stage="teacher", on_progress=stop_at_3)
    assert json.loads((b / "teacher" / "checkpoint.json").read_text())["step"] == 2
    assert [rec["step"] for rec in read_log(b / "teacher" / "log.jsonl")] == [1, 2, 3]
    assert not (b / "teacher" / "dit.safetensors").exists() and not (b / "teacher" / "done.json").exists()
    run_recipe(rb, stage="teacher")

    la, lb = losses(a / "teacher" / "log.jsonl"), losses(b / "teacher" / "log.jsonl")
    assert [rec["step"] for rec in la] == [1, 2, 3, 4]
    assert lb == la
    for f in ("dit.safetensors", "checkpoint.safetensors"):  # EMA teacher; weights + optimiser moments
        wa, wb = load_file(str(a / "teacher" / f)), load_file(str(b / "teacher" / f))
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f
    # a finished stage is not rerun
    stamp = (b / "teacher" / "dit.safetensors").stat().st_mtime_ns
    run_recipe(rb, stage="teacher")
    assert (b / "teacher" / "dit.safetensors").stat().st_mtime_ns == stamp


# --- 5. two processes = one process -------------------------------------------------------

def torchrun(recipe: Path, stage: str, out: Path, nproc: int = 2) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "livetalk_cli", "distill", str(recipe), "--stage", stage, "--out", str(out)]
    res = subprocess.run(cmd, env=env, cwd=out.parent, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]


def assert_logs_match(one: list[dict], two: list[dict]) -> None:
    assert [rec["step"] for rec in two] == [rec["step"] for rec in one]
    for r1, r2 in zip(one, two, strict=True):
        assert r1.keys() == r2.keys()
        for k, v in r1.items():
            if isinstance(v, str):
                assert r2[k] == v
            else:
                assert abs(r2[k] - v) <= 1e-5 * abs(v), (r1["step"], k, v, r2[k])


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_teacher_matches_one_process(tiny_run, tmp_path, parallel):
    _, src = tiny_run
    path = write_recipe(tmp_path / "r.yaml", teacher={"steps": 3, "batch_size": 2, "log_every": 1})
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "parallel": parallel}))
    one = seed_run_folder(src, tmp_path / "one", "vae", "latents")
    two = seed_run_folder(src, tmp_path / "two", "vae", "latents")
    run_recipe(load_recipe(path, out=one), stage="teacher")
    torchrun(path, "teacher", two)

    assert_logs_match(losses(one / "teacher" / "log.jsonl"), losses(two / "teacher" / "log.jsonl"))
    w1, w2 = load_file(str(one / "teacher" / "dit.safetensors")), load_file(str(two / "teacher" / "dit.safetensors"))
    assert w1.keys() == w2.keys()
    assert rel_diff(flat(w1), flat(w2)) < 1e-5
    c1 = load_file(str(one / "teacher" / "checkpoint.safetensors"))
    c2 = load_file(str(two / "teacher" / "checkpoint.safetensors"))
    assert c1.keys() == c2.keys()
    assert rel_diff(flat(c1, "model/dit/"), flat(c2, "model/dit/")) < 1e-5


def test_two_process_dmd_matches_one_process(tiny_run, tmp_path):
    _, src = tiny_run
    # step 1 critic only, step 2 generator + critic
    path = write_recipe(tmp_path / "r.yaml", dmd={"steps": 2, "critic_warmup": 1, "critic_per_gen": 2})
    parts = ("vae", "latents", "teacher", "ode_init")
    one = seed_run_folder(src, tmp_path / "one", *parts)
    two = seed_run_folder(src, tmp_path / "two", *parts)
    run_recipe(load_recipe(path, out=one), stage="dmd")
    torchrun(path, "dmd", two)

    l1, l2 = losses(one / "dmd" / "log.jsonl"), losses(two / "dmd" / "log.jsonl")
    assert [rec["step"] for rec in l1 if "dmd_loss" in rec] == [2]
    assert_logs_match(l1, l2)
    c1 = load_file(str(one / "dmd" / "checkpoint.safetensors"))
    c2 = load_file(str(two / "dmd" / "checkpoint.safetensors"))
    assert c1.keys() == c2.keys()
    for name in ("generator", "critic", "ema"):
        assert rel_diff(flat(c1, f"model/{name}/"), flat(c2, f"model/{name}/")) < 1e-5, name
    s1, s2 = load_file(str(one / "student" / "dit.safetensors")), load_file(str(two / "student" / "dit.safetensors"))
    assert rel_diff(flat(s1), flat(s2)) < 1e-5


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


# --- 7. shipping the student and the report ------------------------------------------------


def test_ship_student_as_embedded_default(tiny_run, tmp_path, monkeypatch):
    from livetalk_cli import pipeline
    from livetalk_cli.distill.ship import ship
    from livetalk_cli.sampling.stream import AvatarStream

    _, out = tiny_run
    dest = tmp_path / "assets" / "demo"
    size = ship(out / "student", dest)
    assert size == sum(p.stat().st_size for p in dest.iterdir()) and size < 20 * 2**20
    assert all(v.dtype in (torch.float16, torch.int64) for v in load_file(str(dest / "dit.safetensors")).values())

    monkeypatch.setattr(pipeline, "EMBEDDED_DEFAULT", dest)
    shipped = pipeline.load_model(device="cpu", dtype="float32")  # no checkpoint: the embedded default
    assert shipped.source == str(dest)
    full = pipeline.load_model(checkpoint=out / "student", device="cpu", dtype="float32")
    frames = []
    for model in (shipped, full):
        stream = AvatarStream(model)
        cfg = model.cfg
        stream.start(torch.zeros(3, cfg.height, cfg.width), "a person talking", seed=3)
        frames.append(stream.next_block(torch.randn(cfg.audio.sample_rate)))
    assert (frames[0] - frames[1]).abs().max() < 0.05  # fp16 weights, fp32 compute


def test_report_on_a_run(tiny_run, tmp_path):
    from livetalk_cli.distill.context import StageContext
    from livetalk_cli.distill.report import build_report
    from livetalk_cli.distill.trainer import Ranks

    recipe_path, out = tiny_run
    ctx = StageContext(load_recipe(recipe_path, out=out), Ranks(0, 1, torch.device("cpu")))
    rep = build_report(ctx, tmp_path / "report", clips=2, stream_seconds=2.0, identities=1, speed_seconds=1.0)
    assert set(rep["models"]) == {"ground_truth", "teacher", "ode_init", "dmd"}
    assert rep["models"]["ground_truth"]["lip_sync_corr"]["mean"] > 0.5  # the world's own clips
    assert rep["models"]["ground_truth"]["lip_sync_corr"]["n"] == 2
    fl = rep["flops"]
    assert fl["teacher_dit_per_frame"] > 0 and fl["student_dit_per_frame"] > 0 and fl["vae_decode_per_frame"] > 0
    assert set(rep["sinks"]) == {"with_sinks", "no_sinks"} and rep["render_speed"]["realtime_factor"] > 0
    assert json.loads((tmp_path / "report" / "report.json").read_text())["clips"] == 2
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| teacher |" in md and "## Targets" in md
