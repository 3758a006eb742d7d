"""Checkpoint folders laid out as LiveTalk's and OmniAvatar's download instructions leave them, read
without a config.json (`checkpoint.read_checkpoint_spec` falls back to this).

LiveTalk (its README and `configs/causal_inference.yaml`), under one folder:

    LiveTalk-1.3B-V0.1/model.safetensors            the causal student DiT
    Wan2.1-T2V-1.3B/Wan2.1_VAE.pth                  Wan's VAE
    Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth umT5 in Wan's layout (+ google/umt5-xxl/ tokenizer)
    wav2vec2/ (or wav2vec2-base-960h/)             facebook/wav2vec2-base-960h, transformers format

OmniAvatar (its README and `configs/inference*.yaml`): the same Wan folder holding the base DiT
(`diffusion_pytorch_model.safetensors`, or the 14B's shards with their index) and
`OmniAvatar-1.3B/pytorch_model.pt` (LoRA + audio modules, merged at load: `lora.py`; lora_alpha
from the `config.json` beside it), `wav2vec2-base-960h/`.

The preset follows the Wan folder's size: Wan2.1-T2V-1.3B → omniavatar-1.3b, Wan2.1-T2V-14B →
omniavatar-14b.
"""

from __future__ import annotations

from pathlib import Path

from livetalk_cli.config import preset
from livetalk_cli.errors import CheckpointError

WAN_PRESETS = {"Wan2.1-T2V-1.3B": "omniavatar-1.3b", "Wan2.1-T2V-14B": "omniavatar-14b"}
VAE_FILE = "Wan2.1_VAE.pth"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"


def _one(paths: list[Path], what: str, root: Path) -> Path | None:
    if len(paths) > 1:
        raise CheckpointError(f"{root}: several {what}: {', '.join(p.name for p in paths[:4])}; keep one or write "
                              "a config.json")
    return paths[0] if paths else None


def _base_dit(wan: Path) -> Path | None:
    """Wan's DiT in its folder: the single file, or the shards' index (diffusers layout)."""
    single = wan / "diffusion_pytorch_model.safetensors"
    if single.is_file():
        return single
    index = wan / "diffusion_pytorch_model.safetensors.index.json"
    return index if index.is_file() else None


def detect_download(root: Path):  # -> CheckpointSpec (imported lazily: checkpoint imports this module)
    """The spec of a LiveTalk or OmniAvatar download folder, or one CheckpointError saying what is
    missing (None of the layouts matched at all: the caller's "no config.json" error)."""
    from livetalk_cli.checkpoint import FILE_ROLES, CheckpointSpec

    root = Path(root)
    wans = [p for name in WAN_PRESETS if (p := root / name).is_dir()]
    student = _one(sorted(root.glob("LiveTalk-*/model.safetensors")), "LiveTalk-*/model.safetensors", root)
    lora = _one(sorted(root.glob("OmniAvatar-*/pytorch_model.pt")), "OmniAvatar-*/pytorch_model.pt", root)
    if not wans or (student is None and lora is None):
        return None
    wan = _one(wans, "Wan2.1 folders", root)
    assert wan is not None
    audio = _one(sorted(p for p in root.glob("wav2vec2*") if (p / "config.json").is_file()),
                 "wav2vec2 folders", root)
    kind = "LiveTalk" if student is not None else "OmniAvatar"
    dit = student if student is not None else _base_dit(wan)
    needed = {"the DiT (diffusion_pytorch_model.safetensors or its .index.json)": dit,
              f"{wan.name}/{VAE_FILE}": (wan / VAE_FILE) if (wan / VAE_FILE).is_file() else None,
              f"{wan.name}/{T5_FILE}": (wan / T5_FILE) if (wan / T5_FILE).is_file() else None,
              "a wav2vec2 folder (wav2vec2/ or wav2vec2-base-960h/ with config.json)": audio}
    missing = [what for what, path in needed.items() if path is None]
    if missing:
        raise CheckpointError(f"{root} looks like a {kind} download but lacks {'; '.join(missing)}")
    files: dict[str, Path | None] = dict.fromkeys(FILE_ROLES)
    files.update(dit=dit, vae=wan / VAE_FILE, text_encoder=wan / T5_FILE, audio_encoder=audio)
    if student is None:
        files["dit_lora"] = lora
    return CheckpointSpec(root, preset(WAN_PRESETS[wan.name]), files)
