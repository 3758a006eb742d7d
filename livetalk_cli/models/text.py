"""Prompt → text context for the DiT's cross-attention.

Every encoder is a callable `prompts -> (B, text_len, text_dim)` float32 whose positions after the
prompt's tokens are ZERO: Wan pads the umT5 output with zeros to 512 and does not mask them, so
the zeros are part of the conditioning.

- `BuiltinTextEncoder`: hashed words → embedding + learned positions (small presets; weights in the
  model checkpoint under this module's own keys `embedding.weight` (vocab, D) and
  `position` (text_len, D)).
- `UMT5TextEncoder`: umT5 encoder (4096-d presets) through `transformers`, from a local directory.
- `WanUMT5TextEncoder`: the same encoder from Wan's own `.pth` (`models/umt5.py`), as LiveTalk,
  OmniAvatar and Wan ship it, with the tokenizer folder of Wan's download.
- `PrecomputedTextEmbeddings`: contexts stored in a safetensors file, looked up by exact prompt
  (serve umT5 presets without loading the 5.7B-parameter encoder).

Legend: B prompts, L text_len, D text_dim, N stored prompts.
"""

from __future__ import annotations

import html
import json
import logging
import re
import zlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from livetalk_cli.config import ModelConfig
from livetalk_cli.errors import CheckpointError, UserError

log = logging.getLogger(__name__)

STAND_IN_SEED = 4321  # seed of the random-init stand-in text encoder
_WORD = re.compile(r"[^\W_]+")  # runs of (unicode) letters and digits


class TextEncoder(Protocol):
    """prompts → context (B, text_len, text_dim) float32, zeros after each prompt's tokens."""

    def __call__(self, prompts: list[str]) -> Tensor: ...


class BuiltinTextEncoder(nn.Module):
    """Hashed-word embeddings plus a learned positional embedding, zeros at padding.

    Tokens: lower-cased runs of letters/digits, each hashed with zlib.crc32 (UTF-8) into ids
    1 .. vocab-1 (0 = pad), truncated/padded to text_len; deterministic across processes.
    Checkpoint keys: `embedding.weight` (vocab, D), `position` (text_len, D).
    """

    def __init__(self, vocab: int, text_len: int, text_dim: int, seed: int | None = None):
        super().__init__()
        if vocab < 2:
            raise UserError("builtin text encoder: text_vocab must be >= 2")
        self.vocab, self.text_len, self.text_dim = vocab, text_len, text_dim
        self.embedding = nn.Embedding(vocab, text_dim)
        self.position = nn.Parameter(torch.zeros(text_len, text_dim))
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int | None = None) -> None:
        """N(0, 1) token embeddings, N(0, 0.1) positions; a seed makes them reproducible."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            emb = torch.randn(self.embedding.weight.shape, generator=gen)
            pos = torch.randn(self.position.shape, generator=gen) * 0.1
            self.embedding.weight.copy_(emb)
            self.position.copy_(pos)

    def tokenize(self, prompts: list[str]) -> Tensor:
        """prompts → ids (B, L) int64 on CPU, 0 after each prompt's words."""
        ids = torch.zeros(len(prompts), self.text_len, dtype=torch.long)
        for b, prompt in enumerate(prompts):
            words = _WORD.findall(prompt.lower())[: self.text_len]
            for i, word in enumerate(words):
                ids[b, i] = 1 + zlib.crc32(word.encode("utf-8")) % (self.vocab - 1)
        return ids

    def forward(self, prompts: list[str]) -> Tensor:
        """prompts → (B, L, D) float32: embedding + position at real tokens, zeros at padding."""
        ids = self.tokenize(prompts).to(self.position.device)  # (B, L)
        x = self.embedding(ids) + self.position[None]  # (B, L, D)
        return (x * (ids != 0)[..., None]).float()


def wan_clean(prompt: str) -> str:
    """Wan's umT5 prompt cleaning (its tokenizer's clean="whitespace", which OmniAvatar and LiveTalk
    inherit): ftfy's text repair, HTML entities unescaped twice, whitespace runs collapsed, stripped."""
    try:
        import ftfy
    except ImportError:
        raise UserError("umT5 prompts need ftfy (Wan's prompt cleaning): pip install 'livetalk[transformers]'"
                        ) from None
    text = html.unescape(html.unescape(ftfy.fix_text(prompt))).strip()
    return " ".join(text.split())


class _UMT5Prompts(ABC):
    """umT5 prompt handling shared by both loaders: Wan's cleaning (`wan_clean`), EOS appended by the
    tokenizer, truncation to text_len; output = the encoder's last hidden states at real tokens,
    zeros after."""

    tokenizer: Any
    device: torch.device
    text_len: int
    text_dim: int

    @abstractmethod
    def _hidden(self, ids: Tensor, mask: Tensor) -> Tensor:
        """(B, L) ids and mask → (B, L, d_model) last hidden states."""

    @torch.no_grad()  # not inference_mode: contexts may feed a training graph
    def __call__(self, prompts: list[str]) -> Tensor:
        """prompts → (B, L, d_model) float32, zeros after each prompt's tokens (EOS included)."""
        texts = [wan_clean(p) for p in prompts]
        batch = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.text_len,
                               add_special_tokens=True, return_tensors="pt")
        ids = batch["input_ids"].to(self.device)  # (B, L)
        mask = batch["attention_mask"].to(self.device)  # (B, L)
        out = self._hidden(ids, mask)  # (B, L, d_model)
        return (out * mask[..., None].to(out.dtype)).float()


def _tokenizer(folder: Path, what: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{what}: cannot load the tokenizer in {folder}: {e}") from None


class UMT5TextEncoder(_UMT5Prompts):
    """umT5 encoder from a local `transformers` directory (tokenizer files + UMT5EncoderModel)."""

    def __init__(self, model_dir: Path, text_len: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise CheckpointError(f"umt5: {model_dir} is not a model directory (no config.json)")
        from transformers import UMT5EncoderModel

        self.tokenizer = _tokenizer(model_dir, "umt5")
        try:
            model = UMT5EncoderModel.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"umt5: cannot load {model_dir}: {e}") from None
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.text_len = text_len
        self.text_dim = model.config.d_model
        log.info("umt5 from %s: d_model %d, text_len %d", model_dir, self.text_dim, text_len)

    def _hidden(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state


TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")


def find_umt5_tokenizer(pth: Path) -> Path:
    """The tokenizer folder Wan's download keeps beside the encoder: `google/umt5-xxl/`, else the
    one folder up to two levels below the .pth's folder that holds tokenizer files."""
    base = Path(pth).parent
    wan = base / "google" / "umt5-xxl"
    if any((wan / f).is_file() for f in TOKENIZER_FILES):
        return wan
    found = sorted({f.parent for pattern in ("*/", "*/*/") for name in TOKENIZER_FILES
                    for f in base.glob(pattern + name)})
    if len(found) == 1:
        return found[0]
    raise CheckpointError(f"umT5 tokenizer for {pth}: expected {wan} (Wan's download layout)"
                          + (f"; found several: {', '.join(map(str, found[:4]))}" if found else ""))


class WanUMT5TextEncoder(_UMT5Prompts):
    """umT5 from Wan's `models_t5_umt5-xxl-enc-bf16.pth` (`models/umt5.py`) with the tokenizer of
    Wan's download (`google/umt5-xxl/` beside it). The weights keep the file's dtype unless given."""

    def __init__(self, pth: Path, text_len: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None, tokenizer_dir: Path | None = None):
        from livetalk_cli.models.umt5 import load_wan_umt5

        folder = Path(tokenizer_dir) if tokenizer_dir is not None else find_umt5_tokenizer(pth)
        self.tokenizer = _tokenizer(folder, f"umT5 {pth}")
        self.device = torch.device(device)
        self.model = load_wan_umt5(pth, device=self.device, dtype=dtype)
        self.text_len = text_len
        self.text_dim = self.model.size.dim
        log.info("umt5 (Wan layout) from %s, tokenizer %s: d_model %d, text_len %d", pth, folder, self.text_dim,
                 text_len)

    def _hidden(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.model(ids, mask)


class PrecomputedTextEmbeddings:
    """Prompt contexts from a safetensors file, looked up by exact prompt string.

    File layout: tensor `embeddings` (N, L', D) plus metadata `prompts` = JSON list of N strings.
    L' <= text_len; shorter rows are zero-padded. Write one with `write_text_embeddings`.
    """

    def __init__(self, path: Path, text_len: int, text_dim: int, device: torch.device | str = "cpu"):
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"text embeddings file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                emb = f.get_tensor("embeddings")
            prompts = json.loads(meta["prompts"])
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"{path}: not a text-embeddings file (tensor 'embeddings' + metadata 'prompts'): {e}"
            ) from None
        if emb.ndim != 3 or len(prompts) != emb.shape[0]:
            raise CheckpointError(f"{path}: {len(prompts)} prompts for embeddings {tuple(emb.shape)}")
        if emb.shape[2] != text_dim or emb.shape[1] > text_len:
            raise CheckpointError(
                f"{path}: embeddings (N, {emb.shape[1]}, {emb.shape[2]}) do not fit "
                f"text_len {text_len}, text_dim {text_dim}"
            )
        self.index = {p: i for i, p in enumerate(prompts)}
        self.text_len, self.text_dim = text_len, text_dim
        self.embeddings = emb.to(torch.device(device), torch.float32)  # (N, L', D)

    @property
    def prompts(self) -> list[str]:
        return list(self.index)

    def __call__(self, prompts: list[str]) -> Tensor:
        """prompts → (B, L, D) float32; an unknown prompt is a UserError."""
        missing = [p for p in prompts if p not in self.index]
        if missing:
            known = ", ".join(repr(p) for p in list(self.index)[:5])
            more = f" (and {len(self.index) - 5} more)" if len(self.index) > 5 else ""
            raise UserError(
                f"no precomputed text embedding for prompt {missing[0]!r}; known prompts: {known}{more}"
            )
        rows = self.embeddings[[self.index[p] for p in prompts]]  # (B, L', D)
        return nn.functional.pad(rows, (0, 0, 0, self.text_len - rows.shape[1]))


def write_text_embeddings(path: Path, prompts: list[str], embeddings: Tensor) -> None:
    """Write prompts and their contexts (N, L, D) (e.g. `UMT5TextEncoder(...)(prompts)`) to `path`."""
    from safetensors.torch import save_file

    if embeddings.ndim != 3 or embeddings.shape[0] != len(prompts):
        raise UserError(f"{len(prompts)} prompts for embeddings of shape {tuple(embeddings.shape)}")
    if len(set(prompts)) != len(prompts):
        raise UserError("text embeddings: prompts must be unique")
    tensors = {"embeddings": embeddings.detach().to("cpu", torch.float32).contiguous()}
    save_file(tensors, str(path), metadata={"prompts": json.dumps(prompts, ensure_ascii=False)})


def build_text_encoder(cfg: ModelConfig, *, source: Path | None, random_weights: bool,
                       device: torch.device | str = "cpu") -> TextEncoder:
    """The preset's text encoder.

    builtin → `BuiltinTextEncoder` (the caller loads its weights from the model checkpoint;
    `source` is not used). umt5 → a directory: `UMT5TextEncoder`; a .safetensors file:
    `PrecomputedTextEmbeddings`; no source with random_weights: a `BuiltinTextEncoder` of the
    preset's text_len/text_dim with random weights from a fixed seed (STAND_IN_SEED) - a stand-in
    with the right shapes, not umT5.
    """
    d = cfg.dit
    if cfg.text_encoder == "builtin":
        return BuiltinTextEncoder(cfg.text_vocab, d.text_len, d.text_dim, seed=STAND_IN_SEED).to(device)
    if cfg.text_encoder != "umt5":
        raise UserError(f"unknown text encoder {cfg.text_encoder!r}")
    if source is None:
        if not random_weights:
            raise UserError(
                f"preset {cfg.name!r} needs umT5 prompt embeddings: pass a local umT5 directory or a "
                "precomputed .safetensors embeddings file, or --random-weights for a stand-in"
            )
        log.warning("text: random stand-in encoder for %r (hashed words), not umT5", cfg.name)
        return BuiltinTextEncoder(cfg.text_vocab, d.text_len, d.text_dim, seed=STAND_IN_SEED).to(device)
    source = Path(source)
    if source.suffix == ".safetensors":
        return PrecomputedTextEmbeddings(source, d.text_len, d.text_dim, device)
    if source.is_dir():
        enc: _UMT5Prompts = UMT5TextEncoder(source, d.text_len, device)
    elif source.suffix == ".pth":
        enc = WanUMT5TextEncoder(source, d.text_len, device)
    else:
        raise UserError(f"text source {source} is neither a umT5 directory, Wan's umT5 .pth nor a .safetensors "
                        "embeddings file")
    if enc.text_dim != d.text_dim:
        raise CheckpointError(f"umt5 in {source} has d_model {enc.text_dim}, preset {cfg.name!r} "
                              f"expects text_dim {d.text_dim}")
    return enc
