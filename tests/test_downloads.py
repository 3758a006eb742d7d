"""Download folders read without a config.json (`downloads.py`), and sharded safetensors with their
index. The layouts are written from LiveTalk's and OmniAvatar's instructions (file names only: the
files here are placeholders, so this checks which file plays which role, not real-size loading)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from livetalk_cli.checkpoint import load_weights, read_checkpoint_spec, read_state_dict
from livetalk_cli.errors import CheckpointError


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def wan_folder(root: Path, name: str = "Wan2.1-T2V-1.3B") -> Path:
    wan = root / name
    touch(wan / "Wan2.1_VAE.pth")
    touch(wan / "models_t5_umt5-xxl-enc-bf16.pth")
    touch(wan / "google" / "umt5-xxl" / "tokenizer.json")
    return wan


def test_livetalk_download_is_a_checkpoint(tmp_path):
    wan = wan_folder(tmp_path)
    student = touch(tmp_path / "LiveTalk-1.3B-V0.1" / "model.safetensors")
    touch(tmp_path / "wav2vec2" / "config.json")
    spec = read_checkpoint_spec(tmp_path)
    assert spec.config.name == "omniavatar-1.3b"
    assert spec.files["dit"] == student and spec.files["dit_lora"] is None
    assert spec.files["vae"] == wan / "Wan2.1_VAE.pth"
    assert spec.files["text_encoder"] == wan / "models_t5_umt5-xxl-enc-bf16.pth"
    assert spec.files["audio_encoder"] == tmp_path / "wav2vec2"


def test_omniavatar_14b_download_with_sharded_base(tmp_path):
    wan = wan_folder(tmp_path, "Wan2.1-T2V-14B")
    index = touch(wan / "diffusion_pytorch_model.safetensors.index.json")
    lora = touch(tmp_path / "OmniAvatar-14B" / "pytorch_model.pt")
    touch(tmp_path / "wav2vec2-base-960h" / "config.json")
    spec = read_checkpoint_spec(tmp_path)
    assert spec.config.name == "omniavatar-14b"
    assert spec.files["dit"] == index and spec.files["dit_lora"] == lora


def test_incomplete_or_unknown_downloads_are_one_line(tmp_path):
    wan_folder(tmp_path)
    touch(tmp_path / "LiveTalk-1.3B-V0.1" / "model.safetensors")
    (tmp_path / "Wan2.1-T2V-1.3B" / "Wan2.1_VAE.pth").unlink()
    with pytest.raises(CheckpointError, match=r"looks like a LiveTalk download but lacks Wan2.1-T2V-1.3B/Wan2.1_VAE"
                                              r".pth; a wav2vec2 folder"):
        read_checkpoint_spec(tmp_path)
    with pytest.raises(CheckpointError, match="no config.json, and not laid out like LiveTalk's or OmniAvatar's"):
        read_checkpoint_spec(tmp_path / "Wan2.1-T2V-1.3B")


def test_sharded_safetensors_through_their_index(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {f"blocks.{i}.w": torch.randn(3, 2, generator=g) for i in range(4)}
    save_file({k: sd[k] for k in ("blocks.0.w", "blocks.1.w")}, str(tmp_path / "m-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in ("blocks.2.w", "blocks.3.w")}, str(tmp_path / "m-00002-of-00002.safetensors"))
    weight_map = {k: f"m-0000{1 + i // 2}-of-00002.safetensors" for i, k in enumerate(sd)}
    index = tmp_path / "m.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    got = read_state_dict(index)
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    index.write_text(json.dumps({"weight_map": {**weight_map, "head.w": "m-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="1 tensor\\(s\\) listed but not in their shards: head.w"):
        read_state_dict(index)
    (tmp_path / "m-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard m-00002-of-00002.safetensors not found"):
        read_state_dict(index)


def _livetalk_student_keys(layers: int, audio_layers: int) -> list[str]:
    """The tensor names of LiveTalk's causal student (`CausalWanModel` in GAIR-NLP/LiveTalk's
    model/causal_wan_video_dit_omniavatar.py, loaded from model.safetensors as saved), written out
    from its module tree: not derived from our DiT or our name mapping."""
    keys = ["patch_embedding.weight", "patch_embedding.bias"]
    keys += [f"{m}.{i}.{p}" for m, idx in (("text_embedding", (0, 2)), ("time_embedding", (0, 2)),
                                            ("time_projection", (1,))) for i in idx for p in ("weight", "bias")]
    for b in range(layers):
        for attn in ("self_attn", "cross_attn"):
            keys += [f"blocks.{b}.{attn}.{lin}.{p}" for lin in "qkvo" for p in ("weight", "bias")]
            keys += [f"blocks.{b}.{attn}.norm_q.weight", f"blocks.{b}.{attn}.norm_k.weight"]
        keys += [f"blocks.{b}.norm3.weight", f"blocks.{b}.norm3.bias", f"blocks.{b}.modulation"]
        keys += [f"blocks.{b}.ffn.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
    keys += ["head.head.weight", "head.head.bias", "head.modulation"]
    keys += [f"audio_proj.{m}.{p}" for m in ("proj", "norm_out") for p in ("weight", "bias")]
    keys += [f"audio_cond_projs.{i}.{p}" for i in range(audio_layers) for p in ("weight", "bias")]
    return keys


def test_a_livetalk_student_file_loads_by_its_own_key_names(tmp_path):
    from livetalk_cli.lora import merged_dit_weights
    from livetalk_cli.models.dit import WanDiT
    from tests.helpers import tiny_cfg

    cfg = tiny_cfg().dit
    shapes = {k: v.shape for k, v in WanDiT(cfg).state_dict().items()}  # sizes only: names come from LiveTalk
    names = _livetalk_student_keys(cfg.num_layers, cfg.num_layers // 2 - 1)
    assert len(names) == len(shapes)
    torch.manual_seed(0)
    tensors = {k: torch.randn(shapes[k]) for k in names}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    dit = WanDiT(cfg)
    load_weights(dit, merged_dit_weights(tmp_path / "model.safetensors", None, None), "student")
    for k, v in dit.state_dict().items():
        torch.testing.assert_close(v, tensors[k], rtol=0, atol=0)
    del tensors["head.modulation"]
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="head.modulation"):
        load_weights(WanDiT(cfg), merged_dit_weights(tmp_path / "bad.safetensors", None, None), "student")
