"""OmniAvatar-style LoRA: merged at load, and `livetalk convert` writes the merged folder once.

The fixture is a tiny base DiT plus a LoRA file written here under PEFT's names for OmniAvatar's
target modules (q, k, v, o, ffn.0, ffn.2 of every block; adapter "default") and a replaced patch
embedding. The reference is the unmerged model computed independently: forward hooks on the base's
Linear layers add (alpha / r) · B(A(x)), as PEFT's LoRA layers do, never touching the merge code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from livetalk_cli.cli import app
from livetalk_cli.errors import CheckpointError
from livetalk_cli.pipeline import load_model
from tests.helpers import random_text_kv
from tests.test_kv_cache import _stream_inputs

TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
           "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
RANK, ALPHA = 4, 8.0
runner = CliRunner()


def write_fixture(root: Path, *, alpha_in: str = "checkpoint") -> tuple[Path, dict[str, torch.Tensor]]:
    """base/ (a tiny random model's checkpoint folder) + omni/pytorch_model.pt (LoRA + a new patch
    embedding) + a config.json that names both. Returns the folder and the LoRA tensors."""
    base = load_model(random_weights=True, preset_name="tiny", device="cpu", seed=3)
    root.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in base.dit.state_dict().items()}, str(root / "dit.safetensors"))
    save_file({k: v.contiguous() for k, v in base.vae.state_dict().items()}, str(root / "vae.safetensors"))
    save_file({k: v.contiguous() for k, v in base.text_encoder.state_dict().items()}, str(root / "text.safetensors"))
    g = torch.Generator().manual_seed(5)
    lora: dict[str, torch.Tensor] = {}
    modules = dict(base.dit.named_modules())
    for i in range(base.cfg.dit.num_layers):
        for t in TARGETS:
            lin = modules[f"blocks.{i}.{t}"]
            lora[f"blocks.{i}.{t}.lora_A.default.weight"] = torch.randn(RANK, lin.in_features, generator=g) * 0.3
            lora[f"blocks.{i}.{t}.lora_B.default.weight"] = torch.randn(lin.out_features, RANK, generator=g) * 0.3
    lora["patch_embedding.weight"] = torch.randn(base.dit.patch_embedding.weight.shape, generator=g) * 0.1
    (root / "omni").mkdir()
    torch.save(lora, root / "omni" / "pytorch_model.pt")
    cfg = {"format": "livetalk/1", "preset": "tiny", "files": {"dit": "dit.safetensors", "vae": "vae.safetensors",
                                                               "text_encoder": "text.safetensors",
                                                               "dit_lora": "omni/pytorch_model.pt"}}
    if alpha_in == "checkpoint":
        cfg["lora_alpha"] = ALPHA
    else:  # OmniAvatar's own experiment config beside the LoRA
        (root / "omni" / "config.json").write_text(json.dumps({"train_architecture": "lora", "lora_alpha": ALPHA}))
    (root / "config.json").write_text(json.dumps(cfg))
    return root, lora


def unmerged_flow(root: Path, lora: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The base model with the LoRA as a side path (hooks) and the patch embedding replaced."""
    base = load_model(random_weights=True, preset_name="tiny", device="cpu", seed=3)
    dit = base.dit
    with torch.no_grad():
        dit.patch_embedding.weight.copy_(lora["patch_embedding.weight"])
    modules = dict(dit.named_modules())
    for i in range(base.cfg.dit.num_layers):
        for t in TARGETS:
            a = lora[f"blocks.{i}.{t}.lora_A.default.weight"]
            b = lora[f"blocks.{i}.{t}.lora_B.default.weight"]
            modules[f"blocks.{i}.{t}"].register_forward_hook(
                lambda mod, inp, out, a=a, b=b: out + (ALPHA / RANK) * (inp[0] @ a.T @ b.T))
    return run_blocks(dit, base.cfg)


def run_blocks(dit, cfg) -> list[torch.Tensor]:
    from livetalk_cli.sampling.block_sampler import BlockSampler

    torch.manual_seed(11)  # random_text_kv draws from the global generator
    text_kv = random_text_kv(dit, cfg)
    noise, ref, audio = _stream_inputs(cfg, dit, seed=7)
    sampler = BlockSampler(dit, cfg)
    sampler.start(text_kv, ref)
    f = cfg.stream.block_frames
    with torch.no_grad():
        return [sampler.denoise_block(nz, audio[:, :, n * f:(n + 1) * f]) for n, nz in enumerate(noise[:3])]


@pytest.mark.parametrize("alpha_in", ["checkpoint", "beside the LoRA"])
def test_lora_merged_at_load_equals_the_unmerged_model(tmp_path, alpha_in):
    root, lora = write_fixture(tmp_path / "ckpt", alpha_in=alpha_in)
    merged = load_model(checkpoint=root, device="cpu")
    got = run_blocks(merged.dit, merged.cfg)
    want = unmerged_flow(root, lora)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)
    plain = load_model(random_weights=True, preset_name="tiny", device="cpu", seed=3)
    assert (run_blocks(plain.dit, plain.cfg)[1] - want[1]).abs().max() > 1e-2  # the LoRA changes the output


def test_bad_loras_are_one_line(tmp_path):
    root, lora = write_fixture(tmp_path / "ckpt")
    cfg = json.loads((root / "config.json").read_text())
    del cfg["lora_alpha"]
    (root / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="lora_alpha unknown"):
        load_model(checkpoint=root, device="cpu")
    cfg["lora_alpha"] = ALPHA
    (root / "config.json").write_text(json.dumps(cfg))
    del lora["blocks.1.ffn.0.lora_B.default.weight"]
    lora["blocks.0.self_attn.q.lora_B.default.weight"] = torch.zeros(3, RANK)
    torch.save(lora, root / "omni" / "pytorch_model.pt")
    with pytest.raises(CheckpointError, match=r"without both lora_A and lora_B: blocks.1.ffn.0"):
        load_model(checkpoint=root, device="cpu")
    lora["blocks.1.ffn.0.lora_B.default.weight"] = torch.zeros(128, RANK)
    torch.save(lora, root / "omni" / "pytorch_model.pt")
    with pytest.raises(CheckpointError, match=r"cannot merge 1 LoRA module\(s\): blocks.0.self_attn.q \(A"):
        load_model(checkpoint=root, device="cpu")


def test_convert_writes_the_merged_folder_once(tmp_path):
    root, _ = write_fixture(tmp_path / "ckpt")
    out = tmp_path / "merged"
    res = runner.invoke(app, ["convert", str(root), str(out)])
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "config.json").read_text())
    assert "dit_lora" not in meta["files"] and "lora_alpha" not in meta
    merged = load_model(checkpoint=root, device="cpu")
    for k, v in load_file(str(out / "dit.safetensors")).items():
        assert torch.equal(v, merged.dit.state_dict()[k]), k
    again = load_model(checkpoint=out, device="cpu")
    torch.testing.assert_close(run_blocks(again.dit, again.cfg)[2], run_blocks(merged.dit, merged.cfg)[2])
    res = runner.invoke(app, ["convert", str(root), str(out)])
    assert res.exit_code == 2 and "exists" in res.output and res.output.count("error:") == 1
    res = runner.invoke(app, ["convert", str(tmp_path / "nothing"), str(tmp_path / "o2")])
    assert res.exit_code == 2 and "no config.json" in res.output
    assert not (tmp_path / "o2").exists()
