"""Ship a trained student as the package's embedded default model (fp16 safetensors).

    python -m livetalk_cli.distill.ship runs/demo/student

copies the checkpoint folder into `livetalk_cli/assets/demo/` with every floating tensor in fp16
(the loader casts back to the run dtype), atomically, and refuses anything over the size budget.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from safetensors.torch import load_file, save_file

from livetalk_cli.checkpoint import read_checkpoint_spec
from livetalk_cli.errors import UserError
from livetalk_cli.files import atomic_dir
from livetalk_cli.pipeline import EMBEDDED_DEFAULT

log = logging.getLogger(__name__)
MAX_BYTES = 20 * 1024 * 1024


def ship(src: Path, dest: Path = EMBEDDED_DEFAULT, max_bytes: int = MAX_BYTES) -> int:
    """Copy checkpoint folder `src` to `dest` in fp16; returns the bytes written."""
    spec = read_checkpoint_spec(src)
    meta = json.loads((src / "config.json").read_text())
    with atomic_dir(dest) as tmp:
        files = {}
        for role, path in spec.files.items():
            if path is None:
                continue
            if path.suffix != ".safetensors":
                raise UserError(f"{path}: only .safetensors weights can be shipped")
            sd = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
            save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / f"{role}.safetensors"))
            files[role] = f"{role}.safetensors"
        meta["files"] = files
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        for p in tmp.iterdir():
            p.chmod(0o644)  # package data: readable by every user
        tmp.chmod(0o755)
        size = sum(p.stat().st_size for p in tmp.iterdir())
        if size > max_bytes:
            raise UserError(f"{src}: {size / 2**20:.1f} MB in fp16, over the {max_bytes / 2**20:.0f} MB budget")
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--dest", type=Path, default=EMBEDDED_DEFAULT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    size = ship(args.checkpoint, args.dest)
    log.info("shipped %s → %s (%.2f MB, fp16)", args.checkpoint, args.dest, size / 2**20)


if __name__ == "__main__":
    main()
