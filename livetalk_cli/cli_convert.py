"""`livetalk convert`: a checkpoint folder with a LoRA (OmniAvatar's) → a merged, self-describing
folder that later loads need not merge again (library: `livetalk_cli/lora.py`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated

import typer

from livetalk_cli.cli_common import UserError, app, err, user_errors

CONVERT_DTYPES = {"keep": None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@app.command("convert")
def convert_cmd(
    src: Annotated[Path, typer.Argument(help="Checkpoint folder (config.json naming the files, e.g. a base DiT + "
                                             "files.dit_lora).")],
    out: Annotated[Path, typer.Argument(help="New folder to write (must not exist).")],
    dtype: Annotated[str, typer.Option(metavar="keep|float32|bfloat16|float16",
                                       help="The merged DiT's dtype (keep: the base's).")] = "keep",
    copy_files: Annotated[bool, typer.Option("--copy-files",
                                             help="Copy the VAE and encoders too (default: refer to them by "
                                                  "absolute path).")] = False,
) -> None:
    """Merge a checkpoint's LoRA into its DiT once: OUT gets dit.safetensors (merged) and a config.json
    that names it, the VAE and the encoders (by absolute path unless --copy-files). Nothing is written
    unless the whole folder is."""
    import torch
    from safetensors.torch import save_file

    from livetalk_cli.checkpoint import read_checkpoint_spec, read_dit_weights
    from livetalk_cli.files import atomic_dir

    with user_errors():
        if dtype not in CONVERT_DTYPES:
            raise UserError(f"unknown --dtype {dtype!r}; choose one of: {', '.join(CONVERT_DTYPES)}")
        if out.exists():
            raise UserError(f"{out} exists: convert writes a new folder")
        spec = read_checkpoint_spec(src)
        meta = json.loads((Path(src) / "config.json").read_text())
        err.print(f"reading {spec.files['dit']}" + (f" + LoRA {spec.files['dit_lora']}" if spec.files["dit_lora"]
                                                    else ""), highlight=False)
        sd = read_dit_weights(spec)
        target = CONVERT_DTYPES[dtype]
        if target is not None:
            sd = {k: v.to(getattr(torch, target)) if v.is_floating_point() else v for k, v in sd.items()}
        files: dict[str, str] = {"dit": "dit.safetensors"}
        with atomic_dir(out) as tmp:
            save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "dit.safetensors"))
            for role, path in spec.files.items():
                if role in ("dit", "dit_lora") or path is None:
                    continue
                if copy_files:
                    (shutil.copytree if path.is_dir() else shutil.copy2)(path, tmp / path.name)
                    files[role] = path.name
                else:
                    files[role] = str(path.resolve())
            config = {"format": meta["format"], **{k: meta[k] for k in ("preset", "model") if k in meta},
                      "files": files}
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    err.print(f"wrote {out}: merged DiT ({len(sd)} tensors)", highlight=False)
