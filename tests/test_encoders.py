"""Audio and text encoders: streaming exactness, OmniAvatar feature layout, zero-padded contexts."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from livetalk_cli.config import AudioConfig, preset
from livetalk_cli.errors import CheckpointError, UserError
from livetalk_cli.models.audio import (
    LogMelEncoder,
    RandomAudioStandIn,
    Wav2Vec2Encoder,
    build_audio_encoder,
    frame_features,
    samples_per_frame,
    window_frames,
)
from livetalk_cli.models.text import (
    BuiltinTextEncoder,
    PrecomputedTextEmbeddings,
    UMT5TextEncoder,
    build_text_encoder,
    write_text_embeddings,
)

SR, FPS = 16000, 16
SPF = 1000


@functools.cache
def speechlike(seconds: float, peak: float = 0.3, seed: int = 0) -> torch.Tensor:
    """Harmonic source with a gliding pitch, a syllable-rate envelope and a little noise.
    Cached: callers must not modify the result in place."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SR), dtype=torch.float64) / SR
    phase = 2 * math.pi * torch.cumsum(140 + 30 * torch.sin(2 * math.pi * 0.7 * t), 0) / SR
    h = torch.arange(1, 25, dtype=torch.float64)[:, None]  # (harmonics, 1)
    src = (torch.sin(h * phase) / h).sum(0)
    x = src * (0.5 + 0.5 * torch.sin(2 * math.pi * 3 * t)) ** 2
    x = x / x.abs().max() * peak + 0.003 * torch.randn(t.shape, generator=gen, dtype=torch.float64)
    return x.float()


# --- audio ---------------------------------------------------------------------------------


def test_samples_per_frame() -> None:
    assert samples_per_frame(16000, 16) == 1000
    assert window_frames(AudioConfig(context_s=1.0, lookahead_s=0.25), 16) == (16, 4)
    assert window_frames(AudioConfig(context_s=0.5, lookahead_s=0.0), 25) == (13, 0)
    assert samples_per_frame(16000, 25) == 640
    with pytest.raises(UserError):
        samples_per_frame(16000, 24 * 7)  # 16000 / 168 is not an integer


@pytest.mark.parametrize("context", [1, 4])
def test_logmel_blockwise_equals_one_shot(context: int) -> None:
    enc = LogMelEncoder(AudioConfig(n_mels=16, mel_frames_per_video_frame=4), FPS)
    assert (enc.feature_dim, enc.margin, enc.hop) == (64, 256, 250)
    wave = speechlike(3.3)  # 52.8 video frames: the last block runs past the end
    total = 9 + 12 * 4  # blocks of 9, then 12 frames: 57 frames
    full = frame_features(enc, wave, SPF, 0, total, 0, 0)
    assert full.shape == (total, 64) and full.dtype == torch.float32
    start, blocks = 0, []
    for n in [9, 12, 12, 12, 12]:
        blocks.append(frame_features(enc, wave, SPF, start, n, context, 0))
        assert blocks[-1].shape == (n, 64)
        start += n
    torch.testing.assert_close(torch.cat(blocks), full, rtol=1e-5, atol=1e-5)


def test_logmel_levels_and_end_padding() -> None:
    cfg = AudioConfig(n_mels=32, mel_frames_per_video_frame=4)
    enc = LogMelEncoder(cfg, FPS)
    silence = frame_features(enc, torch.zeros(SR), SPF, 0, 16, 2, 1)
    assert torch.all(silence == silence.flatten()[0]) and -1.1 < silence[0, 0] < -0.9
    wave = speechlike(1.0, peak=0.5)
    quiet = frame_features(enc, 0.1 * wave, SPF, 0, 16, 0, 0)
    loud = frame_features(enc, wave, SPF, 0, 16, 0, 0)
    assert torch.all(loud > quiet)
    assert loud.mean() > quiet.mean() + 0.2 and loud.max() < 1.5 and quiet.min() > -1.1

    # The last frames of a 3.3 s wave (frames 48..56) see zeros after sample 52_800.
    wave = speechlike(3.3)
    got = frame_features(enc, wave, SPF, 48, 9, 1, 2)
    seg = torch.zeros(2 * enc.margin + 12 * SPF)  # frames 47..58 plus margins
    first = 47 * SPF - enc.margin
    seg[: wave.shape[0] - first] = wave[first:]
    torch.testing.assert_close(got, enc.encode(seg, 12)[1:10], rtol=0, atol=0)
    beyond = frame_features(enc, wave, SPF, 54, 3, 1, 0)  # frames starting past the audio
    torch.testing.assert_close(beyond, silence[:3])


def test_random_stand_in_and_builder() -> None:
    cfg = preset("omniavatar-1.3b")
    enc = build_audio_encoder(cfg, model_dir=None, random_weights=True, device="cpu")
    assert isinstance(enc, RandomAudioStandIn) and enc.feature_dim == 10752
    again = build_audio_encoder(cfg, model_dir=None, random_weights=True, device="cpu")
    wave = speechlike(1.0)
    a = frame_features(enc, wave, SPF, 0, 5, 1, 0)
    assert a.shape == (5, 10752)
    torch.testing.assert_close(a, frame_features(again, wave, SPF, 0, 5, 1, 0))
    with pytest.raises(UserError, match="--random-weights"):
        build_audio_encoder(cfg, model_dir=None, random_weights=False, device="cpu")
    tiny = build_audio_encoder(preset("tiny"), model_dir=None, random_weights=False, device="cpu")
    assert isinstance(tiny, LogMelEncoder) and tiny.feature_dim == preset("tiny").dit.audio_dim


def _tiny_wav2vec2(path: Path, kernels: tuple[int, ...]) -> torch.nn.Module:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(0)
    config = Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8,) * 7, conv_kernel=kernels, conv_stride=(5, 2, 2, 2, 2, 2, 2),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, vocab_size=8,
    )
    model = Wav2Vec2Model(config).eval()
    model.save_pretrained(path)
    return model


def test_wav2vec2_layout(tmp_path: Path) -> None:
    model = _tiny_wav2vec2(tmp_path, (10, 3, 3, 3, 3, 2, 2))  # wav2vec2's kernels, stride 320
    enc = Wav2Vec2Encoder(tmp_path, FPS, "cpu")
    assert (enc.feature_dim, enc.margin) == ((2 + 2) * 16, 0)
    wave = speechlike(1.0)
    num_frames = 12
    feats = enc.encode(wave[: num_frames * SPF], num_frames)
    assert feats.shape == (num_frames, 64) and feats.dtype == torch.float32

    # Rebuild the last hidden state from the HF submodules on the interpolated CNN features.
    x = wave[: num_frames * SPF]
    x = (x - x.mean()) / torch.sqrt(x.var(correction=0) + 1e-7)
    with torch.no_grad():
        cnn = model.feature_extractor(x[None])  # (1, C, T)
        cnn = F.interpolate(cnn, size=num_frames, mode="linear", align_corners=True)
        hidden, _ = model.feature_projection(cnn.transpose(1, 2))
        last = model.encoder(hidden).last_hidden_state[0]
    torch.testing.assert_close(feats[:, :16], last, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats[:, -16:], last, rtol=1e-5, atol=1e-5)  # last layer's output

    # Windowed features have the requested shape; the window is what the transformer sees.
    block = frame_features(enc, wave, SPF, 4, 6, 4, 2)
    assert block.shape == (6, 64)

    with pytest.raises(CheckpointError):
        Wav2Vec2Encoder(tmp_path / "missing", FPS, "cpu")
    with pytest.raises(CheckpointError, match="10752"):  # a tiny model cannot feed the 1.3B preset
        build_audio_encoder(preset("omniavatar-1.3b"), model_dir=tmp_path, random_weights=False,
                            device="cpu")


def test_wav2vec2_matches_hf_hidden_states(tmp_path: Path) -> None:
    """kernel == stride and 320 samples per frame: interpolation is the identity, so the whole
    feature vector must equal HF's own cat([last_hidden_state, *hidden_states])."""
    model = _tiny_wav2vec2(tmp_path, (5, 2, 2, 2, 2, 2, 2))
    enc = Wav2Vec2Encoder(tmp_path, 50, "cpu")  # 16000 / 50 = 320 samples per frame
    x = speechlike(0.4)[: 20 * 320]
    feats = enc.encode(x, 20)
    xn = (x - x.mean()) / torch.sqrt(x.var(correction=0) + 1e-7)
    with torch.no_grad():
        out = model(xn[None], output_hidden_states=True)
    assert len(out.hidden_states) == 3
    ref = torch.cat([out.last_hidden_state, *out.hidden_states], dim=-1)[0]
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-5)


def test_wav2vec2_start_grid_spreads_n_minus_1_frames_of_audio_over_n(tmp_path: Path) -> None:
    """OmniAvatar/LiveTalk's grid: the CNN features of (N-1)/fps seconds, interpolated to N points
    (rebuilt here from the HF submodules); the last frame's own audio is not read."""
    model = _tiny_wav2vec2(tmp_path, (10, 3, 3, 3, 3, 2, 2))
    enc = Wav2Vec2Encoder(tmp_path, FPS, "cpu", frame_grid="start")
    n = 12
    wave = speechlike(1.0)[: n * SPF]
    feats = enc.encode(wave, n)
    x = wave[: (n - 1) * SPF]
    x = (x - x.mean()) / torch.sqrt(x.var(correction=0) + 1e-7)
    with torch.no_grad():
        cnn = F.interpolate(model.feature_extractor(x[None]), size=n, mode="linear", align_corners=True)
        last = model.encoder(model.feature_projection(cnn.transpose(1, 2))[0]).last_hidden_state[0]
    torch.testing.assert_close(feats[:, :16], last, rtol=1e-5, atol=1e-5)
    changed = wave.clone()
    changed[(n - 1) * SPF:] = 0.5
    torch.testing.assert_close(enc.encode(changed, n), feats, rtol=0, atol=0)
    span = Wav2Vec2Encoder(tmp_path, FPS, "cpu")  # the default grid reads all N frames' audio
    assert not torch.equal(span.encode(changed, n), span.encode(wave, n))
    assert preset("omniavatar-1.3b").audio.frame_grid == "start" and preset("tiny").audio.frame_grid == "span"
    with pytest.raises(ValueError, match="frame_grid"):
        Wav2Vec2Encoder(tmp_path, FPS, "cpu", frame_grid="middle")


def test_wav2vec2_rejects_other_models(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(CheckpointError):
        Wav2Vec2Encoder(tmp_path, FPS, "cpu")


# --- text ----------------------------------------------------------------------------------


def test_builtin_text_encoder() -> None:
    enc = BuiltinTextEncoder(vocab=512, text_len=8, text_dim=32, seed=1)
    ids = enc.tokenize(["A person, smiling!", "a PERSON smiling", ""])
    assert ids.shape == (3, 8)
    assert torch.equal(ids[0], ids[1]) and (ids[0, :3] > 0).all() and (ids[0, 3:] == 0).all()
    assert (ids[2] == 0).all()
    # crc32 hashing: fixed across processes (no PYTHONHASHSEED dependence).
    import zlib

    assert ids[0, 0].item() == 1 + zlib.crc32(b"a") % 511
    ctx = enc(["a person smiling", "a person frowning", "one two three four five six seven eight nine"])
    assert ctx.shape == (3, 8, 32) and ctx.dtype == torch.float32
    assert (ctx[0, 3:] == 0).all() and (ctx[0, :3].abs().sum(-1) > 0).all()
    assert (ctx[2].abs().sum(-1) > 0).all()  # truncated to text_len, no padding
    assert not torch.allclose(ctx[0], ctx[1])
    same = BuiltinTextEncoder(vocab=512, text_len=8, text_dim=32, seed=1)
    torch.testing.assert_close(same(["a person smiling"]), ctx[:1])
    assert set(enc.state_dict()) == {"embedding.weight", "position"}


def _tiny_umt5(path: Path) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    words = ["a", "person", "talking", "smiling", "happy", "man", "woman", "calm"]
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)
    torch.manual_seed(0)
    config = UMT5Config(vocab_size=16, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
    UMT5EncoderModel(config).save_pretrained(path)


def test_umt5_text_encoder(tmp_path: Path) -> None:
    _tiny_umt5(tmp_path)
    enc = UMT5TextEncoder(tmp_path, text_len=10, device="cpu")
    ctx = enc(["a person  talking", "happy woman smiling calm"])
    assert ctx.shape == (2, 10, 16) and ctx.dtype == torch.float32
    assert (ctx[0, 4:] == 0).all() and (ctx[0, :4].abs().sum(-1) > 0).all()  # 3 words + EOS
    assert (ctx[1, 5:] == 0).all() and (ctx[1, :5].abs().sum(-1) > 0).all()
    # Real tokens equal the model run alone on the unpadded prompt (bidirectional, masked pads).
    ids = torch.tensor([[3, 4, 5, 1]])
    with torch.no_grad():
        alone = enc.model(input_ids=ids).last_hidden_state[0]
    torch.testing.assert_close(ctx[0, :4], alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError):
        UMT5TextEncoder(tmp_path / "missing", text_len=10)


def test_precomputed_embeddings_round_trip(tmp_path: Path) -> None:
    prompts = [f"prompt number {i}" for i in range(7)]
    emb = torch.randn(7, 6, 16)
    emb[:, 4:] = 0
    path = tmp_path / "emb.safetensors"
    write_text_embeddings(path, prompts, emb)
    table = PrecomputedTextEmbeddings(path, text_len=8, text_dim=16)
    out = table([prompts[3], prompts[0]])
    assert out.shape == (2, 8, 16)
    torch.testing.assert_close(out[:, :6], emb[[3, 0]])
    assert (out[:, 6:] == 0).all()
    with pytest.raises(UserError, match="known prompts: 'prompt number 0'"):
        table(["not stored"])
    with pytest.raises(CheckpointError):
        PrecomputedTextEmbeddings(path, text_len=8, text_dim=32)


def test_build_text_encoder(tmp_path: Path) -> None:
    tiny = preset("tiny")
    enc = build_text_encoder(tiny, source=None, random_weights=False, device="cpu")
    assert isinstance(enc, BuiltinTextEncoder)
    assert enc(["hello"]).shape == (1, tiny.dit.text_len, tiny.dit.text_dim)
    small = preset("omniavatar-1.3b").replace(text_vocab=64)  # keep the stand-in table small
    stand_in = build_text_encoder(small, source=None, random_weights=True, device="cpu")
    assert stand_in(["a person talking"]).shape == (1, 512, 4096)
    again = build_text_encoder(small, source=None, random_weights=True, device="cpu")
    torch.testing.assert_close(again(["a person talking"]), stand_in(["a person talking"]))
    with pytest.raises(UserError, match="--random-weights"):
        build_text_encoder(small, source=None, random_weights=False, device="cpu")
    path = tmp_path / "emb.safetensors"
    write_text_embeddings(path, ["hi"], torch.randn(1, 512, 4096))
    table = build_text_encoder(small, source=path, random_weights=False, device="cpu")
    assert isinstance(table, PrecomputedTextEmbeddings)
