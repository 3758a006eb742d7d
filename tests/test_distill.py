"""`livetalk distill`: every stage end to end, exact resume, multi-process parity, shipping, report (CPU).

Everything here runs single-threaded (torch and the torchrun children): on a small, busy machine
oversubscribed BLAS threads make the tiny stages ~10x slower, and one thread is deterministic.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from livetalk_cli.distill.context import StageContext
from livetalk_cli.distill.recipe import STAGES, load_recipe
from livetalk_cli.distill.run import run_recipe
from livetalk_cli.distill.trainer import Ranks, read_log
from livetalk_cli.pipeline import load_model
from tests.distill_helpers import seed_run_folder, write_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent

runner = CliRunner()

UNTIMED = ("time", "samples_per_s")  # log fields that legitimately differ between runs


def losses(path: Path) -> list[dict]:
    return [{k: v for k, v in rec.items() if k not in UNTIMED} for rec in read_log(path)]


def flat(tensors: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
    return torch.cat([tensors[k].double().flatten() for k in sorted(tensors) if k.startswith(prefix)])


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


# --- 2. the decoder stage's losses --------------------------------------------------------


def test_mouth_map_is_the_metrics_mouth_count():
    """The differentiable map the decoder stage trains on sums to what the lip-sync metric measures."""
    from livetalk_cli.config import preset
    from livetalk_cli.distill.data import mouth_map, video_tensor, world_clip
    from livetalk_cli.world.metrics import measure_mouth_open

    clip = world_clip(preset("demo"), 7, 9)
    video = video_tensor(clip.frames)[None]
    ours = mouth_map(video).mean(dim=(2, 3))[0].numpy()
    theirs = measure_mouth_open(clip.frames)
    assert theirs.max() > 5 * theirs.min() + 1e-4  # the mouth moves in this clip
    assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-6)


def test_mouth_region_marks_the_mouth_cells():
    """The teacher's loss weights: the latent cells the mouth crosses in the clip, and few others."""
    from livetalk_cli.config import preset
    from livetalk_cli.distill.data import mouth_map, mouth_region, video_tensor, world_clip

    cfg = preset("demo")
    f = cfg.vae.spatial_factor
    clip = world_clip(cfg, 3, 33)
    video = video_tensor(clip.frames)
    region = mouth_region(video, f)
    assert region.shape == (cfg.height // f, cfg.width // f)
    peak = mouth_map(video[None])[0].amax(0)  # (H, W): the mouth interior at its widest
    y, x = divmod(int(peak.argmax()), cfg.width)
    assert float(peak[y, x]) > 0.9 and float(region[y // f, x // f]) > 0.9
    # grown by one cell: every neighbour of the mouth's cell is in the region too
    assert float(region[y // f - 1: y // f + 2, x // f - 1: x // f + 2].min()) > 0.9
    assert float((region > 0.5).float().mean()) < 0.25  # the mouth and lips, not the face
    assert float(region[0, 0]) < 1e-3 and float(region[-1, -1]) < 1e-3  # background corners


def test_teacher_loss_weights_follow_the_mouth_region():
    from livetalk_cli.distill.data import LatentSet
    from livetalk_cli.distill.flow import masked_mse
    from livetalk_cli.errors import UserError

    torch.manual_seed(0)
    lat, aud = torch.randn(3, 4, 3, 2, 2).half(), torch.randn(3, 9, 8).half()
    mouth = torch.zeros(3, 2, 2)
    mouth[:, 1, 0] = 1.0
    data = LatentSet(lat, aud, ["a", "b", "c"], mouth.half())
    w = data.loss_weights([2, 0], 4.0, torch.device("cpu"))
    assert w.shape == (2, 1, 1, 2, 2) and w[:, 0, 0, 1, 0].tolist() == [5.0, 5.0] and float(w.sum()) == 2 * 8.0
    a, b = torch.randn(2, 4, 3, 2, 2), torch.randn(2, 4, 3, 2, 2)
    frames = torch.tensor([0.0, 1.0, 1.0]).view(1, 1, 3, 1, 1)
    weight = frames * w
    expected = ((a - b).square() * weight).sum(dim=(1, 2, 3, 4)) / weight.expand_as(a).sum(dim=(1, 2, 3, 4))
    assert float(masked_mse(a, b, weight)) == pytest.approx(float(expected.mean()), rel=1e-6)
    # with weight 0 on the mouth it is the plain masked MSE; a larger weight moves it toward the mouth's error
    assert float(masked_mse(a, b, frames * data.loss_weights([2, 0], 0.0, torch.device("cpu")))) == pytest.approx(
        float(masked_mse(a, b, frames)), rel=1e-6)
    with pytest.raises(UserError, match="no mouth regions"):
        LatentSet(lat, aud, ["a", "b", "c"]).loss_weights([0], 4.0, torch.device("cpu"))


def test_decoder_loss_trains_the_decoder_only():
    from livetalk_cli.config import preset
    from livetalk_cli.distill.data import mouth_map
    from livetalk_cli.distill.vae_stage import VAEAutoencoder, decoder_loss
    from livetalk_cli.models.vae import WanVAE

    torch.manual_seed(0)
    vae = WanVAE(preset("tiny").vae)
    model = VAEAutoencoder(vae, train_encoder=False)
    video = torch.rand(2, 3, 5, 32, 32) * 2 - 1
    video[:, :, :, 12:18, 10:20] = torch.tensor([70.0, 12.0, 28.0]).view(1, 3, 1, 1, 1) / 127.5 - 1  # a mouth
    eps = torch.randn(2, 4, 2, 4, 4)
    loss, parts = decoder_loss(model, video, eps, mouth_weight=20.0, mouth_map_weight=1.0, dilate=2)
    loss.backward()
    assert all(p.grad is None for p in [*vae.encoder.parameters(), *vae.conv1.parameters()])
    assert all(p.grad is not None for p in [*vae.decoder.parameters(), *vae.conv2.parameters()])
    # without the mouth terms it is the plain L1 + MSE of the reconstruction
    plain, parts0 = decoder_loss(model, video, eps, mouth_weight=0.0, mouth_map_weight=0.0, dilate=2)
    recon = model(video, eps)[0].detach()
    assert float(plain) == pytest.approx(float((recon - video).abs().mean() + (recon - video).square().mean()),
                                         rel=1e-5)
    assert parts0["mouth"] == pytest.approx(float((mouth_map(recon) - mouth_map(video)).abs().mean() * 100), rel=1e-5)
    # the mouth weighting moves the pixel loss toward the mouth's error
    assert parts["l1"] != pytest.approx(parts0["l1"], rel=1e-3)
    # the temporal term: frame-to-frame change of the output that the target does not have
    with_t, parts_t = decoder_loss(model, video, eps, mouth_weight=0.0, mouth_map_weight=0.0, dilate=2,
                                   temporal_weight=2.0)
    want = ((recon[:, :, 1:] - recon[:, :, :-1]) - (video[:, :, 1:] - video[:, :, :-1])).abs().mean()
    assert parts_t["temporal"] == pytest.approx(float(want), rel=1e-5)
    assert float(with_t) == pytest.approx(float(plain) + 2.0 * float(want), rel=1e-5)
    still = video[:, :, :1].expand_as(video).contiguous()  # a still target: every output change counts
    _, parts_s = decoder_loss(model, still, eps, mouth_weight=0.0, mouth_map_weight=0.0, dilate=2,
                              temporal_weight=1.0)
    out = model(still, eps)[0].detach()
    assert parts_s["temporal"] == pytest.approx(float((out[:, :, 1:] - out[:, :, :-1]).abs().mean()), rel=1e-5)


def test_latent_set_gains_reference_latents_in_place(tmp_path):
    from livetalk_cli.config import preset
    from livetalk_cli.distill.data import encode_world, latents_complete, load_latents, world_clip
    from livetalk_cli.models.audio import build_audio_encoder
    from livetalk_cli.models.vae import WanVAE

    torch.manual_seed(0)
    still = preset("tiny")
    single = still.replace(still_reference_latents=0)
    vae = WanVAE(still.vae).eval()
    enc = build_audio_encoder(still, model_dir=None, random_weights=False, device="cpu")
    encode_world(tmp_path, single, vae, enc, num_clips=2, clip_frames=9)
    assert latents_complete(tmp_path, 2) and not latents_complete(tmp_path, 2, reference=True)
    before = load_latents(tmp_path, 2)
    assert before.reference is None
    torch.testing.assert_close(before.references([1], torch.device("cpu")), before.latents[1:2, :, :1].float())

    encode_world(tmp_path, still, vae, enc, num_clips=2, clip_frames=9)  # an older set, a still-reference model
    assert latents_complete(tmp_path, 2, reference=True)
    after = load_latents(tmp_path, 2)
    assert torch.equal(after.latents, before.latents) and after.prompts == before.prompts
    image = (torch.from_numpy(world_clip(still, 1, 1).reference).permute(2, 0, 1).float() / 127.5 - 1)[None, :, None]
    with torch.no_grad():
        expected = vae.encode_reference(image, 4)
    torch.testing.assert_close(after.references([1], torch.device("cpu")), expected.half().float()[0:1])


def test_encode_chunked_restarts_the_encoder():
    from livetalk_cli.config import preset
    from livetalk_cli.distill.vae_stage import encode_chunked
    from livetalk_cli.models.vae import WanVAE

    torch.manual_seed(0)
    vae = WanVAE(preset("tiny").vae).eval()
    video = torch.rand(1, 3, 25, 32, 32) * 2 - 1
    with torch.no_grad():
        one, two = vae.encode(video), vae.encode(video[:, :, 12:])
    torch.testing.assert_close(encode_chunked(vae, video, 25), one)  # one chunk: the plain encode
    z = encode_chunked(vae, video, 13)  # frames 0-12 and 12-24: 4 + 3 latent frames
    assert z.shape == (1, 4, 7, 4, 4)
    torch.testing.assert_close(z[:, :, :4], one[:, :, :4])
    torch.testing.assert_close(z[:, :, 4:], two[:, :, 1:])  # the second chunk's own encode, first latent dropped
    assert not torch.allclose(z[:, :, 4:], one[:, :, 4:], atol=1e-3)  # ... not the long encode's


# --- 3. every stage end to end ------------------------------------------------------------


def test_every_stage_end_to_end(tiny_run):
    recipe_path, out = tiny_run
    r = load_recipe(recipe_path, out=out)
    for stage in STAGES:
        assert (out / stage / "done.json").is_file(), stage
    assert json.loads((out / "recipe.json").read_text())["name"] == "tiny-test"

    # the latent set carries each clip's mouth region on the latent grid (the teacher's loss weights)
    shard = load_file(str(out / "latents" / "shard_00000.safetensors"))
    assert shard["mouth"].shape == (4, 8, 8) and 0 < float(shard["mouth"].float().mean()) < 0.5
    # ... and (tiny, like demo, has still_reference_latents 4) each clip's still-reference latents,
    # whose latent 0 is the clip's latent frame 0: the reference image, encoded alone
    assert shard["reference"].shape == (4, 4, 4, 8, 8)
    torch.testing.assert_close(shard["reference"][:, :, 0], shard["latents"][:, :, 0], atol=2e-3, rtol=0)

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
        vae = load_file(str(out / "decoder" / "vae.safetensors"))  # the fine-tuned decoder ships
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

    # decoder stage: the encoder (so every latent made from it) is untouched, the decoder moved
    base, tuned = load_file(str(out / "vae" / "vae.safetensors")), load_file(str(out / "decoder" / "vae.safetensors"))
    assert base.keys() == tuned.keys()
    frozen = [k for k in base if k.startswith(("encoder.", "conv1."))]
    trained = [k for k in base if k.startswith(("decoder.", "conv2."))]
    assert frozen and trained and len(frozen) + len(trained) == len(base)
    assert all(torch.equal(base[k], tuned[k]) for k in frozen)
    assert any(not torch.equal(base[k], tuned[k]) for k in trained)
    done = json.loads((out / "decoder" / "done.json").read_text())
    assert done["eval_clips"] == 1
    assert -1 <= done["roundtrip_lip_sync_before"] <= 1 and -1 <= done["roundtrip_lip_sync_after"] <= 1

    # every logged number of every training stage is finite, and the losses are there
    for stage, key in (("vae", "l1"), ("decoder", "mouth"), ("teacher", "loss"), ("ode_init", "loss"),
                       ("dmd", "critic_loss")):
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
    parts = ("vae", "decoder", "latents", "teacher", "ode_init")  # decoder: the student folder's VAE
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


def test_dmd_with_long_rollouts_trains_past_the_cache_window(tiny_run, tmp_path):
    """Rollouts of 2..5 blocks (3 sinks + a 6-frame ring: the ring wraps from block 4 on), longer
    than a clip's audio: every step's length is logged, in range, and the generator's step trains
    (finite losses, the student's weights move)."""
    _, src = tiny_run
    path = write_recipe(tmp_path / "r.yaml", dmd={"steps": 4, "critic_warmup": 1, "critic_per_gen": 1,
                                                  "max_rollout_blocks": 5})
    run = seed_run_folder(src, tmp_path / "run", "vae", "decoder", "latents", "teacher", "ode_init")
    run_recipe(load_recipe(path, out=run), stage="dmd")
    log = losses(run / "dmd" / "log.jsonl")
    lengths = [rec["rollout_blocks"] for rec in log]
    assert len(lengths) == 4 and all(2 <= n <= 5 for n in lengths) and len(set(lengths)) > 1
    gen = [rec["dmd_loss"] for rec in log if "dmd_loss" in rec]
    assert len(gen) == 3 and all(math.isfinite(v) for v in gen)
    before = load_file(str(run / "ode_init" / "dit.safetensors"))
    after = load_file(str(run / "dmd" / "dit.safetensors"))
    assert rel_diff(flat(after), flat(before)) > 0


# --- 7. shipping the student and the report ------------------------------------------------


def test_ship_student_as_embedded_default(tiny_run, tmp_path, monkeypatch):
    from livetalk_cli import pipeline
    from livetalk_cli.distill.ship import ship
    from livetalk_cli.runtime.stream import AvatarStream

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
    from livetalk_cli.distill.report import build_report

    recipe_path, out = tiny_run
    ctx = StageContext(load_recipe(recipe_path, out=out), Ranks(0, 1, torch.device("cpu")))
    rep = build_report(ctx, tmp_path / "report", clips=2, stream_seconds=3.0, identities=2, sink_seconds=2.0,
                       sink_identities=2, speed_seconds=1.0, vae_stream_frames=17)
    assert set(rep["models"]) == {"ground_truth", "vae_roundtrip", "teacher", "ode_init", "dmd"}
    assert rep["models"]["ground_truth"]["lip_sync_corr"]["mean"] > 0.5  # the world's own clips
    assert rep["models"]["ground_truth"]["lip_sync_corr"]["n"] == 2
    fl = rep["flops"]
    assert fl["teacher_dit_per_frame"] > 0 and fl["student_dit_per_frame"] > 0 and fl["vae_decode_per_frame"] > 0
    assert set(rep["sinks"]["variants"]) == {"with_sinks", "no_sinks"} and rep["render_speed"]["realtime_factor"] > 0
    long = rep["long_streams"]["rows"]
    assert set(long) == {"ground_truth", "vae_roundtrip", "dmd"}  # the final student
    gt = long["ground_truth"]["windows"]
    assert len(gt) == 1 and gt[0]["lip_sync_corr"]["n"] == 2 and gt[0]["lip_sync_corr"]["mean"] > 0.5
    assert gt[0]["offset_within_1"] == 1.0 and len(gt[0]["offsets"]) == 2
    t = rep["targets"]
    assert t["long_min_window_lipsync"] == long["dmd"]["windows"][0]["lip_sync_corr"]["mean"]
    text = (tmp_path / "report" / "report.md").read_text()
    assert "Long streams" in text and "Identity sinks over" in text and "0-3.06 s" in text
    sinks = rep["sinks"]["variants"]
    per = {v: sinks[v]["per_identity"]["identity_error"] for v in sinks}
    gains = [per["no_sinks"][i] - per["with_sinks"][i] for i in range(2)]
    got = rep["sinks"]["paired_gain"]["identity_error"]
    assert got["mean"] == pytest.approx(sum(gains) / 2) and got["n"] == 2
    for name in ("anchored", "plain"):
        vs = rep["vae_stream"][name]
        assert vs["frames"] == 17 and 0 < vs["first_s"] < 255 and 0 < vs["last_s"] < 255
    assert rep["vae_stream"]["plain"]["anchor_every"] == 0
    assert json.loads((tmp_path / "report" / "report.json").read_text())["clips"] == 2
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| teacher |" in md and "## Targets" in md and "| VAE stream" in md and "| vae_roundtrip |" in md
