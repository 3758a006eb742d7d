"""Wan's umT5 `.pth` (`models/umt5.py`) against transformers' UMT5 implementation.

The fixture is a tiny random `UMT5EncoderModel` (32 buckets, max distance 128, gated GELU: umt5-xxl's
shape, small) whose weights this test writes out under Wan's key names with a mapping written here
from the two libraries' module layouts (Wan's `T5Encoder` with `shared_pos=False`; transformers'
`UMT5EncoderModel`), never through the code under test."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from livetalk_cli.errors import CheckpointError
from livetalk_cli.models.text import UMT5TextEncoder, WanUMT5TextEncoder, build_text_encoder
from livetalk_cli.models.umt5 import load_wan_umt5
from tests.helpers import tiny_cfg
from tests.test_encoders import _tiny_umt5

transformers = pytest.importorskip("transformers")


def wan_layout(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {"token_embedding.weight": hf["encoder.embed_tokens.weight"],
           "norm.weight": hf["encoder.final_layer_norm.weight"]}
    i = 0
    while f"encoder.block.{i}.layer.0.layer_norm.weight" in hf:
        a, f = f"encoder.block.{i}.layer.0.", f"encoder.block.{i}.layer.1."
        out |= {f"blocks.{i}.norm1.weight": hf[a + "layer_norm.weight"],
                f"blocks.{i}.pos_embedding.embedding.weight": hf[a + "SelfAttention.relative_attention_bias.weight"],
                f"blocks.{i}.norm2.weight": hf[f + "layer_norm.weight"],
                f"blocks.{i}.ffn.gate.0.weight": hf[f + "DenseReluDense.wi_0.weight"],  # GELU(wi_0 x) * wi_1 x
                f"blocks.{i}.ffn.fc1.weight": hf[f + "DenseReluDense.wi_1.weight"],
                f"blocks.{i}.ffn.fc2.weight": hf[f + "DenseReluDense.wo.weight"]}
        out |= {f"blocks.{i}.attn.{p}.weight": hf[a + f"SelfAttention.{p}.weight"] for p in "qkvo"}
        i += 1
    return {k: v.clone() for k, v in out.items()}


@pytest.fixture(scope="module")
def hf_model():
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    config = UMT5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
                        relative_attention_num_buckets=32, relative_attention_max_distance=128,
                        feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1)
    model = UMT5EncoderModel(config).eval()
    with torch.no_grad():  # norms away from 1 so they matter
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def test_wan_layout_encoder_equals_transformers_umt5(tmp_path, hf_model):
    """Lengths up to 150 reach the log-spaced buckets and the clamp at distance 128; padding masked."""
    torch.save(wan_layout(hf_model.state_dict()), tmp_path / "t5.pth")
    ours = load_wan_umt5(tmp_path / "t5.pth")
    assert ours.size.num_layers == 3 and ours.size.num_heads == 4 and ours.size.num_buckets == 32
    g = torch.Generator().manual_seed(1)
    for length, real in ((12, 12), (40, 29), (150, 150)):
        ids = torch.randint(2, 50, (2, length), generator=g)
        mask = torch.ones(2, length, dtype=torch.long)
        mask[1, real:] = 0
        ids[1, real:] = 0
        with torch.no_grad():
            want = hf_model(input_ids=ids, attention_mask=mask).last_hidden_state
            got = ours(ids, mask)
        keep = mask.bool()
        torch.testing.assert_close(got[keep], want[keep], atol=2e-5, rtol=2e-5)
        assert (want[0] - want[0].mean()).abs().mean() > 1e-2  # the comparison has signal


def test_wan_layout_loads_in_the_files_dtype_and_bad_files_are_one_line(tmp_path, hf_model):
    sd = {k: v.to(torch.bfloat16) for k, v in wan_layout(hf_model.state_dict()).items()}
    torch.save(sd, tmp_path / "bf16.pth")
    model = load_wan_umt5(tmp_path / "bf16.pth")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert load_wan_umt5(tmp_path / "bf16.pth", dtype=torch.float32).norm.weight.dtype == torch.float32
    del sd["blocks.1.ffn.fc2.weight"]
    sd["blocks.1.ffn.fc3.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): blocks.1.ffn.fc2.weight; 1 unexpected key"):
        load_wan_umt5(tmp_path / "broken.pth")
    torch.save({"encoder.embed_tokens.weight": torch.zeros(2, 2)}, tmp_path / "hf.pth")
    with pytest.raises(CheckpointError, match="is not a Wan umT5 encoder"):
        load_wan_umt5(tmp_path / "hf.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read umT5 weights"):
        load_wan_umt5(tmp_path / "junk.pth")


def test_text_encoder_from_wans_download_layout(tmp_path):
    """Wan's folder: the .pth with `google/umt5-xxl/` (tokenizer) beside it. Prompts give what
    transformers gives from the same weights in its own folder layout."""
    hf_dir = tmp_path / "hf"
    _tiny_umt5(hf_dir)
    reference = UMT5TextEncoder(hf_dir, text_len=10)
    wan = tmp_path / "Wan2.1-T2V-1.3B"
    (wan / "google").mkdir(parents=True)
    reference.tokenizer.save_pretrained(wan / "google" / "umt5-xxl")
    torch.save(wan_layout(reference.model.state_dict()), wan / "models_t5_umt5-xxl-enc-bf16.pth")
    enc = WanUMT5TextEncoder(wan / "models_t5_umt5-xxl-enc-bf16.pth", text_len=10)
    prompts = ["a person  talking", "happy woman smiling calm"]
    torch.testing.assert_close(enc(prompts), reference(prompts), atol=1e-5, rtol=1e-5)
    cfg = tiny_cfg()
    cfg = dataclasses.replace(cfg, text_encoder="umt5", dit=dataclasses.replace(cfg.dit, text_dim=16, text_len=10))
    built = build_text_encoder(cfg, source=wan / "models_t5_umt5-xxl-enc-bf16.pth", random_weights=False)
    assert isinstance(built, WanUMT5TextEncoder)
    (wan / "google" / "umt5-xxl").rename(wan / "tok")
    (wan / "tok").rename(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match=r"expected .*google/umt5-xxl \(Wan's download layout\)"):
        WanUMT5TextEncoder(wan / "models_t5_umt5-xxl-enc-bf16.pth", text_len=10)


def test_prompts_are_cleaned_as_wan_cleans_them(tmp_path):
    """Wan's tokenizer clean="whitespace": ftfy's repair, HTML entities unescaped twice, whitespace
    collapsed. The expectations are written out here."""
    from livetalk_cli.models.text import wan_clean

    assert wan_clean("  a  man &amp;amp; a\twoman\n") == "a man & a woman"
    assert wan_clean("cafÃ© talk") == "café talk"  # UTF-8 read as Latin-1, repaired
    assert wan_clean("a&nbsp;person &lt;smiling&gt;") == "a person <smiling>"
    hf_dir = tmp_path / "hf"
    _tiny_umt5(hf_dir)
    enc = UMT5TextEncoder(hf_dir, text_len=10)
    torch.testing.assert_close(enc(["happy &amp; calm"]), enc(["happy & calm"]))
