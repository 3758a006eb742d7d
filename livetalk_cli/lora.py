"""LoRA weights merged into a base DiT's state dict: W + (alpha / r) · B · A.

OmniAvatar ships its audio-driven model as a LoRA over Wan2.1-T2V plus fully trained modules
(`OmniAvatar-1.3B/pytorch_model.pt`: the audio projections, the 33-channel patch embedding). Its
LoRA was injected with PEFT on the modules named q, k, v, o, ffn.0 and ffn.2, so the file names each
pair `<module>.lora_A[.<adapter>].weight` (r × in) and `<module>.lora_B[.<adapter>].weight` (out × r),
and PEFT scales the update by lora_alpha / r (OmniAvatar reports r 128, alpha 64; r is read from the
shapes, alpha from the LoRA folder's `config.json` or the checkpoint's). Every other tensor of the
file replaces or adds the base's tensor of that name (`.base_layer` is PEFT's name for the wrapped
weight and is dropped). Names go through the same prefix / diffusers mapping as any DiT file.

The merge runs in float32 and casts back to the base weight's dtype, one module at a time.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from torch import Tensor

from livetalk_cli.errors import CheckpointError

log = logging.getLogger(__name__)

_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.[^.]+)?\.weight$")


def split_lora(sd: dict[str, Tensor], where: Path) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, Tensor]]:
    """A LoRA file's tensors → ({module: (A, B)}, every other tensor under its plain name)."""
    halves: dict[str, dict[str, Tensor]] = {}
    others: dict[str, Tensor] = {}
    for key, value in sd.items():
        m = _LORA.match(key)
        if m:
            halves.setdefault(m["module"], {})[m["side"]] = value
        elif ".lora_" in key:
            raise CheckpointError(f"{where}: unsupported LoRA tensor {key!r} (only lora_A / lora_B weights)")
        else:
            others[key.replace(".base_layer.", ".")] = value
    unpaired = sorted(m for m, h in halves.items() if len(h) != 2)
    if unpaired:
        raise CheckpointError(f"{where}: LoRA modules without both lora_A and lora_B: {', '.join(unpaired[:6])}")
    return {m: (h["A"], h["B"]) for m, h in halves.items()}, others


def lora_alpha_beside(path: Path) -> float | None:
    """`lora_alpha` from the `config.json` in the LoRA file's folder (OmniAvatar's experiment folder)."""
    cfg = Path(path).parent / "config.json"
    if not cfg.is_file():
        return None
    try:
        value = json.loads(cfg.read_text()).get("lora_alpha")
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, int | float) else None


def merge_lora(base: dict[str, Tensor], lora: dict[str, Tensor], alpha: float, where: Path) -> dict[str, Tensor]:
    """base (Wan names) + a LoRA file's tensors (Wan names) → the merged state dict (a new dict)."""
    pairs, others = split_lora(lora, where)
    if not pairs:
        raise CheckpointError(f"{where}: no LoRA weights (no <module>.lora_A / lora_B tensors)")
    out = {**base, **others}  # the file's own tensors first: a LoRA applies to what the model will hold
    problems = []
    for module, (a, b) in sorted(pairs.items()):
        key = f"{module}.weight"
        w = out.get(key)
        if w is None:
            problems.append(f"{module} (no {key} in the base)")
            continue
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or tuple(b.shape) != (w.shape[0], r) or a.shape[1] != w.shape[1]:
            problems.append(f"{module} (A {tuple(a.shape)}, B {tuple(b.shape)} vs W {tuple(w.shape)})")
            continue
        out[key] = (w.float() + (alpha / r) * (b.float() @ a.float())).to(w.dtype)
    if problems:
        shown = "; ".join(problems[:4]) + (f"; +{len(problems) - 4} more" if len(problems) > 4 else "")
        raise CheckpointError(f"{where}: cannot merge {len(problems)} LoRA module(s): {shown}")
    log.info("merged %d LoRA modules (r %s, alpha %g) and %d other tensors from %s", len(pairs),
             sorted({a.shape[0] for a, _ in pairs.values()}), alpha, len(others), where)
    return out


def merged_dit_weights(dit: Path, lora: Path | None, alpha: float | None) -> dict[str, Tensor]:
    """A checkpoint's DiT tensors under Wan's names, with its LoRA merged in if it has one."""
    from livetalk_cli.checkpoint import read_state_dict, to_wan_names

    sd = to_wan_names(read_state_dict(dit))
    if lora is None:
        return sd
    alpha = alpha if alpha is not None else lora_alpha_beside(lora)
    if alpha is None:
        raise CheckpointError(f"{lora}: lora_alpha unknown: set \"lora_alpha\" in the checkpoint's config.json "
                              "(OmniAvatar reports 64) or keep OmniAvatar's config.json beside the LoRA file")
    with torch.no_grad():
        return merge_lora(sd, to_wan_names(read_state_dict(lora)), alpha, lora)
