"""Real-size presets (meta device), Wan/diffusers key naming, and checkpoint validation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from livetalk_cli.checkpoint import (
    check_keys,
    load_weights,
    read_checkpoint_spec,
    read_state_dict,
    save_checkpoint,
    to_wan_names,
)
from livetalk_cli.config import preset
from livetalk_cli.errors import CheckpointError
from livetalk_cli.models.dit import WanDiT


def _meta_dit(name: str) -> WanDiT:
    with torch.device("meta"):
        return WanDiT(preset(name).dit)


def test_wan_1_3b_parameter_count_and_keys():
    dit = _meta_dit("wan2.1-t2v-1.3b")
    assert sum(p.numel() for p in dit.parameters()) == 1_418_996_800
    shapes = {k: tuple(v.shape) for k, v in dit.state_dict().items()}
    expected = {
        "patch_embedding.weight": (1536, 16, 1, 2, 2),
        "patch_embedding.bias": (1536,),
        "text_embedding.0.weight": (1536, 4096),
        "text_embedding.2.weight": (1536, 1536),
        "time_embedding.0.weight": (1536, 256),
        "time_embedding.2.weight": (1536, 1536),
        "time_projection.1.weight": (9216, 1536),
        "time_projection.1.bias": (9216,),
        "blocks.29.modulation": (1, 6, 1536),
        "blocks.0.self_attn.q.weight": (1536, 1536),
        "blocks.0.self_attn.norm_q.weight": (1536,),
        "blocks.0.self_attn.norm_k.weight": (1536,),
        "blocks.0.norm3.weight": (1536,),
        "blocks.0.norm3.bias": (1536,),
        "blocks.0.cross_attn.o.bias": (1536,),
        "blocks.0.cross_attn.norm_k.weight": (1536,),
        "blocks.0.ffn.0.weight": (8960, 1536),
        "blocks.0.ffn.2.weight": (1536, 8960),
        "head.modulation": (1, 2, 1536),
        "head.head.weight": (64, 1536),
        "head.head.bias": (64,),
    }
    for k, shape in expected.items():
        assert shapes[k] == shape, k
    block_keys = {k.split(".", 2)[2] for k in shapes if k.startswith("blocks.0.")}
    assert len(block_keys) == 27  # modulation, 2 x (4 linears x 2 + 2 norms), norm3 x 2, ffn x 4
    assert len(shapes) == 30 * 27 + 15
    assert not any("audio" in k for k in shapes)


def test_omniavatar_presets_audio_and_reference_layout():
    dit = _meta_dit("omniavatar-1.3b")
    shapes = {k: tuple(v.shape) for k, v in dit.state_dict().items()}
    assert shapes["patch_embedding.weight"] == (1536, 33, 1, 2, 2)
    assert shapes["audio_proj.proj.weight"] == (32, 43008)
    assert shapes["audio_proj.norm_out.weight"] == (32,)
    assert shapes["audio_cond_projs.13.weight"] == (1536, 32)
    assert "audio_cond_projs.14.weight" not in shapes
    big = _meta_dit("omniavatar-14b")
    shapes14 = {k: tuple(v.shape) for k, v in big.state_dict().items()}
    assert shapes14["blocks.39.ffn.0.weight"] == (13824, 5120)
    assert shapes14["audio_cond_projs.18.weight"] == (5120, 32)


# Diffusers' WanTransformer3DModel names, written out by hand (not produced by the mapping).
DIFFUSERS_TOP = [
    "patch_embedding.weight", "patch_embedding.bias",
    "condition_embedder.text_embedder.linear_1.weight", "condition_embedder.text_embedder.linear_1.bias",
    "condition_embedder.text_embedder.linear_2.weight", "condition_embedder.text_embedder.linear_2.bias",
    "condition_embedder.time_embedder.linear_1.weight", "condition_embedder.time_embedder.linear_1.bias",
    "condition_embedder.time_embedder.linear_2.weight", "condition_embedder.time_embedder.linear_2.bias",
    "condition_embedder.time_proj.weight", "condition_embedder.time_proj.bias",
    "scale_shift_table", "proj_out.weight", "proj_out.bias",
]
DIFFUSERS_BLOCK = [
    "scale_shift_table",
    "attn1.to_q.weight", "attn1.to_q.bias", "attn1.to_k.weight", "attn1.to_k.bias",
    "attn1.to_v.weight", "attn1.to_v.bias", "attn1.to_out.0.weight", "attn1.to_out.0.bias",
    "attn1.norm_q.weight", "attn1.norm_k.weight",
    "attn2.to_q.weight", "attn2.to_q.bias", "attn2.to_k.weight", "attn2.to_k.bias",
    "attn2.to_v.weight", "attn2.to_v.bias", "attn2.to_out.0.weight", "attn2.to_out.0.bias",
    "attn2.norm_q.weight", "attn2.norm_k.weight",
    "norm2.weight", "norm2.bias",
    "ffn.net.0.proj.weight", "ffn.net.0.proj.bias", "ffn.net.2.weight", "ffn.net.2.bias",
]
WAN_TOP = [
    "patch_embedding.weight", "patch_embedding.bias",
    "text_embedding.0.weight", "text_embedding.0.bias", "text_embedding.2.weight", "text_embedding.2.bias",
    "time_embedding.0.weight", "time_embedding.0.bias", "time_embedding.2.weight", "time_embedding.2.bias",
    "time_projection.1.weight", "time_projection.1.bias",
    "head.modulation", "head.head.weight", "head.head.bias",
]
WAN_BLOCK = [
    "modulation",
    "self_attn.q.weight", "self_attn.q.bias", "self_attn.k.weight", "self_attn.k.bias",
    "self_attn.v.weight", "self_attn.v.bias", "self_attn.o.weight", "self_attn.o.bias",
    "self_attn.norm_q.weight", "self_attn.norm_k.weight",
    "cross_attn.q.weight", "cross_attn.q.bias", "cross_attn.k.weight", "cross_attn.k.bias",
    "cross_attn.v.weight", "cross_attn.v.bias", "cross_attn.o.weight", "cross_attn.o.bias",
    "cross_attn.norm_q.weight", "cross_attn.norm_k.weight",
    "norm3.weight", "norm3.bias",
    "ffn.0.weight", "ffn.0.bias", "ffn.2.weight", "ffn.2.bias",
]


def _t2v_tiny():
    cfg = preset("tiny")
    return cfg.replace(dit=cfg.dit.__class__(**{**_fields(cfg.dit), "in_dim": 4, "audio_dim": None}))


def _fields(dc):
    return {f: getattr(dc, f) for f in dc.__dataclass_fields__}


@pytest.mark.parametrize("prefix", ["", "model.", "module._orig_mod."])
def test_diffusers_names_load_into_wan_model(tmp_path, prefix):
    cfg = _t2v_tiny()
    torch.manual_seed(0)
    src = WanDiT(cfg.dit)
    wan_sd = src.state_dict()
    diff_sd = {}
    for d, w in zip(DIFFUSERS_TOP, WAN_TOP, strict=True):
        diff_sd[prefix + d] = wan_sd[w]
    for n in range(cfg.dit.num_layers):
        for d, w in zip(DIFFUSERS_BLOCK, WAN_BLOCK, strict=True):
            diff_sd[f"{prefix}blocks.{n}.{d}"] = wan_sd[f"blocks.{n}.{w}"]
    assert len(diff_sd) == len(wan_sd)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in diff_sd.items()}, str(path))
    dst = WanDiT(cfg.dit)
    load_weights(dst, to_wan_names(read_state_dict(path)), "dit")
    for k, v in dst.state_dict().items():
        torch.testing.assert_close(v, wan_sd[k], rtol=0, atol=0)


def test_wrapped_torch_pickle_loads(tmp_path):
    cfg = preset("tiny")
    src = WanDiT(cfg.dit)
    torch.save({"generator_ema": {f"model.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "ckpt.pt")
    dst = WanDiT(cfg.dit)
    load_weights(dst, to_wan_names(read_state_dict(tmp_path / "ckpt.pt")), "dit")
    torch.testing.assert_close(dst.head.modulation, src.head.modulation)


def test_mismatched_keys_are_one_error_listing_them():
    cfg = preset("tiny")
    dit = WanDiT(cfg.dit)
    sd = dict(dit.state_dict())
    del sd["blocks.1.ffn.0.weight"]
    sd["blocks.9.extra.weight"] = torch.zeros(1)
    sd["patch_embedding.weight"] = torch.zeros(64, 5, 1, 2, 2)
    with pytest.raises(CheckpointError) as e:
        check_keys(dit, sd, "dit.safetensors")
    msg = str(e.value)
    assert "\n" not in msg
    assert "1 missing key(s): blocks.1.ffn.0.weight" in msg
    assert "1 unexpected key(s): blocks.9.extra.weight" in msg
    assert "patch_embedding.weight: checkpoint (64, 5, 1, 2, 2) vs model (64, 9, 1, 2, 2)" in msg


def test_unreadable_weights_and_bad_config(tmp_path):
    bad = tmp_path / "dit.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        read_state_dict(bad)
    with pytest.raises(CheckpointError, match="no config.json"):
        read_checkpoint_spec(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "livetalk/1", "preset": "tiny", "bogus": 1}))
    with pytest.raises(CheckpointError, match="unknown key"):
        read_checkpoint_spec(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "livetalk/1", "preset": "tiny", "files": {}}))
    with pytest.raises(CheckpointError, match="files.dit is required"):
        read_checkpoint_spec(tmp_path)


def test_save_checkpoint_round_trip(tmp_path):
    cfg = preset("tiny")
    dit = WanDiT(cfg.dit)
    save_checkpoint(tmp_path / "ck", cfg, {"dit": dit, "vae": dit})  # vae slot only exercises the writer
    spec = read_checkpoint_spec(tmp_path / "ck")
    assert spec.config == cfg
    sd = read_state_dict(spec.files["dit"])
    for k, v in dit.state_dict().items():
        torch.testing.assert_close(sd[k], v, rtol=0, atol=0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
