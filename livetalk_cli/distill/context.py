"""What every stage gets: the recipe, the ranks, the device, the model config so far, a progress hook.

Stage outputs live under the recipe's `out` folder, one folder per stage:

    vae/vae.safetensors, vae/latent_stats.json     the small causal VAE and its latent mean/std
    latents/shard_*.safetensors                     world clips encoded by that VAE
    teacher/dit.safetensors                         the bidirectional teacher
    trajectories/shard_*.safetensors                teacher ODE trajectories at the student's steps
    ode_init/dit.safetensors                        the causal student after ODE initialisation
    dmd/dit.safetensors                             the DMD student (EMA weights when EMA ran)
    student/                                        a `livetalk render --checkpoint` folder
    <stage>/done.json                               the stage finished, and from what (markers.py)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from livetalk_cli.config import ModelConfig
from livetalk_cli.distill.markers import stage_done
from livetalk_cli.distill.recipe import Recipe
from livetalk_cli.distill.trainer import Ranks, full_state
from livetalk_cli.errors import UserError
from livetalk_cli.files import save_safetensors_atomic
from livetalk_cli.models.dit import WanDiT
from livetalk_cli.models.text import BuiltinTextEncoder
from livetalk_cli.models.vae import WanVAE

ProgressHook = Callable[[str, int, int, dict[str, float]], None]


@dataclass
class StageContext:
    recipe: Recipe
    ranks: Ranks
    on_progress: ProgressHook | None = None

    @property
    def device(self) -> torch.device:
        return self.ranks.device

    @property
    def out(self) -> Path:
        return self.recipe.out

    @property
    def precision(self) -> torch.dtype:
        return torch.bfloat16 if self.recipe.dtype == "bfloat16" else torch.float32

    @property
    def latents_dir(self) -> Path:
        """The encoded training clips: the recipe's own folder, or OUT/latents (world)."""
        return Path(self.recipe.world.latents) if self.recipe.world.latents else self.out / "latents"

    def progress(self, stage: str, done: int, total: int, values: dict[str, float] | None = None) -> None:
        if self.on_progress and self.ranks.main:
            self.on_progress(stage, done, total, values or {})

    # --- the model config as trained so far ----------------------------------------------
    def model_config(self) -> ModelConfig:
        """The recipe's model with the latent mean/std the VAE stage measured (if it ran)."""
        cfg = self.recipe.model
        stats = self.out / "vae" / "latent_stats.json"
        if stats.is_file():
            s = json.loads(stats.read_text())
            cfg = cfg.replace(vae=dataclasses.replace(cfg.vae, latent_mean=tuple(s["mean"]),
                                                      latent_std=tuple(s["std"])))
        return cfg

    def text_encoder(self) -> BuiltinTextEncoder:
        cfg = self.recipe.model
        if cfg.text_encoder != "builtin":
            raise UserError("world stages need the built-in text encoder")
        return BuiltinTextEncoder(cfg.text_vocab, cfg.dit.text_len, cfg.dit.text_dim,
                                  seed=self.recipe.seed).to(self.device)

    def load_vae(self) -> WanVAE:
        """The trained VAE, with the `decoder` stage's fine-tuned decoder once that stage is done
        (the encoder is the same, so latents made before stay valid)."""
        stage = "decoder" if stage_done(self, "decoder") else "vae"
        path, teacher = self.out / stage / "vae.safetensors", self.recipe.teacher.checkpoint
        if stage == "vae" and "vae" not in self.recipe.stages and not path.is_file() and teacher:
            # a recipe on data encoded elsewhere (`livetalk prepare`): the teacher checkpoint's VAE
            from livetalk_cli.checkpoint import read_checkpoint_spec
            from livetalk_cli.pipeline import checkpoint_vae

            vae = checkpoint_vae(read_checkpoint_spec(Path(teacher)))
        else:
            vae = WanVAE(self.model_config().vae)
            vae.load_state_dict(require(path, f"the {stage} stage"))
        return vae.to(self.device).eval().requires_grad_(False)

    def new_dit(self, seed_offset: int = 0) -> WanDiT:
        torch.manual_seed(self.recipe.seed + seed_offset)
        return self._dit_ready(WanDiT(self.model_config().dit))

    def load_dit(self, stage: str) -> WanDiT:
        dit = WanDiT(self.model_config().dit)
        if stage == "teacher" and self.recipe.teacher.checkpoint:
            from livetalk_cli.checkpoint import load_weights, read_checkpoint_spec, read_dit_weights

            spec = read_checkpoint_spec(Path(self.recipe.teacher.checkpoint))
            load_weights(dit, read_dit_weights(spec), "teacher DiT")
        else:
            dit.load_state_dict(require(self.out / stage / "dit.safetensors", f"the {stage} stage"))
        return self._dit_ready(dit)

    def _dit_ready(self, dit: WanDiT) -> WanDiT:
        dit.grad_checkpointing = self.recipe.grad_checkpointing
        return dit.to(self.device)


def require(path: Path, producer: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"{path} not found: run {producer} first (livetalk distill RECIPE --stage ...)")
    return load_file(str(path))


def save_weights(module: nn.Module, path: Path, ranks: Ranks) -> None:
    """Final stage weights, atomically, written by rank 0 (every rank gathers FSDP shards)."""
    state = full_state(module)
    if not ranks.main:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(state, path)


def stage_modules(recipe: Recipe, device: torch.device | str = "meta") -> dict[str, dict[str, nn.Module]]:
    """The modules each stage trains or runs, built (not loaded) on `device` — e.g. `meta` to check
    that a real-scale recipe fits together without allocating it."""
    from livetalk_cli.distill.dmd import Rollout
    from livetalk_cli.distill.flow import FlowModel

    cfg = recipe.model
    with torch.device(device):
        def dit() -> WanDiT:
            return WanDiT(cfg.dit)

        out: dict[str, dict[str, nn.Module]] = {}
        if "vae" in recipe.stages:
            out["vae"] = {"vae": WanVAE(cfg.vae)}
        if "decoder" in recipe.stages:
            out["decoder"] = {"vae": WanVAE(cfg.vae)}
        if "teacher" in recipe.stages:
            out["teacher"] = {"teacher": FlowModel(dit())}
        if "trajectories" in recipe.stages:
            out["trajectories"] = {"teacher": FlowModel(dit())}
        if "ode_init" in recipe.stages:
            out["ode_init"] = {"student": FlowModel(dit())}
        if "dmd" in recipe.stages:
            out["dmd"] = {"generator": Rollout(FlowModel(dit()), cfg.stream), "critic": FlowModel(dit()),
                          "real": FlowModel(dit())}
    return out
