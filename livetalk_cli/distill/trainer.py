"""The training loop every stage shares: ranks, seeding, checkpoints, logs, progress.

* Ranks: `torchrun` sets RANK/WORLD_SIZE; we join a process group (gloo on CPU, nccl on CUDA)
  and wrap trainable models from outside (DDP, or FSDP2 `fully_shard` for big models). One
  process is the same code with a world of one.
* Determinism: every random draw of a sample (which clip, its noise, its timestep, its
  condition dropout) comes from a generator seeded by (recipe seed, stage, step, global sample
  index). A global batch therefore gives the same losses on any number of ranks, and a resumed
  run replays exactly the same draws.
* Checkpoints: `checkpoint.safetensors` (models, EMA, optimiser moments) + `checkpoint.json`
  (step, stage config, optimiser hyper-parameters), written atomically every `ckpt_every`
  steps. A killed run loses at most one interval; the log is cut back to the checkpoint.
* Logs: JSON lines (`log.jsonl`) with every loss, learning rate and throughput; a rich
  progress bar shows the live losses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from livetalk_cli.distill.markers import checkpoint_matches
from livetalk_cli.distill.recipe import LoopConfig, OptimConfig
from livetalk_cli.errors import CheckpointError
from livetalk_cli.files import atomic_path, save_safetensors_atomic

log = logging.getLogger(__name__)


# --- ranks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, global_batch: int) -> range:
        """The global sample indices this rank owns within a step (contiguous slices)."""
        if global_batch % self.world:
            raise ValueError(f"batch {global_batch} does not split over {self.world} ranks")
        per = global_batch // self.world
        return range(self.rank * per, (self.rank + 1) * per)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalars over ranks (for logging)."""
        if self.world == 1 or not values:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64)
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(values, t.tolist(), strict=True)}

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_ranks(device: torch.device) -> Ranks:
    """Join the torchrun process group if there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(0, 1, device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return Ranks(rank, world, device)


def wrap(model: nn.Module, ranks: Ranks, parallel: str) -> nn.Module:
    """DDP for small models, FSDP2 for big ones; unchanged in a single process."""
    if ranks.world == 1:
        return model
    if parallel == "fsdp":
        # The root only: the DiT's text/audio preparation calls submodules outside their own
        # forward, so per-block sharding would leave them sharded; the root's pre-forward
        # gathers everything (ZeRO-3 at model granularity).
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ranks.device.index] if ranks.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


# --- seeding -----------------------------------------------------------------------------


def sample_seed(seed: int, stage: str, step: int, index: int, salt: str = "") -> int:
    """A 63-bit seed for one sample's draws; independent of ranks and process history."""
    key = f"{seed}/{stage}/{step}/{index}/{salt}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def generator(seed: int, stage: str, step: int, index: int, salt: str = "") -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(seed, stage, step, index, salt))


# --- optimisation ------------------------------------------------------------------------


def make_optimizer(params: Iterator[nn.Parameter] | list[nn.Parameter], cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(list(params), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def lr_at(cfg: OptimConfig, step: int, total: int) -> float:
    """Learning rate for optimiser step `step` (0-based) of `total`."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "aggressive":
        return cfg.lr * (cfg.boost if step < cfg.boost_steps else 1.0)
    if cfg.schedule == "cosine":
        span = max(total - cfg.warmup_steps, 1)
        frac = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
    return cfg.lr


def optimizer_step(opt: torch.optim.Optimizer, params: list[nn.Parameter], cfg: OptimConfig, lr: float) -> float:
    """Clip, set the lr, step, zero. Returns the pre-clip gradient norm."""
    grads = [p for p in params if p.grad is not None]
    if cfg.grad_clip > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(grads, cfg.grad_clip))
    else:
        norm = float(torch.linalg.vector_norm(torch.stack([g.grad.norm() for g in grads]))) if grads else 0.0
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """`ema` holds full tensors (copied before wrapping); FSDP-sharded weights are gathered."""
    for pe, pm in zip(ema.parameters(), unwrap(model).parameters(), strict=True):
        pe.lerp_(full(pm.detach()).to(pe.dtype), 1 - decay)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every rank must call it); others as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict with sharded tensors gathered, on the CPU (call on every rank)."""
    return {k: full(v).detach().contiguous().cpu() for k, v in module.state_dict().items()}


# --- checkpoints -------------------------------------------------------------------------


def _model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if dist.is_initialized():
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = unwrap(model).state_dict()
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def _optim_state(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True) if dist.is_initialized() else None
    sd = get_optimizer_state_dict(model, opt, options=opts)
    # Under torchrun the full state dict lives on rank 0 only; other ranks get {} (and do not write).
    tensors = {f"{fqn}::{k}": v.detach().contiguous().cpu()
               for fqn, st in sd.get("state", {}).items() for k, v in st.items()}
    return tensors, sd.get("param_groups", [])


@dataclass
class TrainState:
    """What a stage checkpoints: named models (trainable or EMA) and their optimisers."""

    models: dict[str, nn.Module]
    optimizers: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = field(default_factory=dict)
    step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-able stage state

    def save(self, directory: Path, ranks: Ranks, meta: dict[str, Any]) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for name, model in self.models.items():
            tensors.update({f"model/{name}/{k}": v for k, v in _model_state(model).items()})
        groups: dict[str, Any] = {}
        for name, (model, opt) in self.optimizers.items():
            t, g = _optim_state(model, opt)
            tensors.update({f"optim/{name}/{k}": v for k, v in t.items()})
            groups[name] = g
        tensors["__step__"] = torch.tensor(self.step)
        if not ranks.main:
            return
        directory.mkdir(parents=True, exist_ok=True)
        info = {"step": self.step, "extra": self.extra, "param_groups": groups, **meta}
        # Weights first, then the JSON that points at them: a crash in between leaves the
        # previous JSON, whose step is older than the weights; load checks they agree.
        save_safetensors_atomic(tensors, directory / "checkpoint.safetensors")
        with atomic_path(directory / "checkpoint.json") as tmp:
            tmp.write_text(json.dumps(info, indent=1, default=str))

    def load(self, directory: Path) -> bool:
        """Restore from `directory` if it has a checkpoint; False when starting fresh."""
        j, w = directory / "checkpoint.json", directory / "checkpoint.safetensors"
        if not j.is_file() or not w.is_file():
            return False
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        info = json.loads(j.read_text())
        tensors = load_file(str(w))
        if int(tensors.pop("__step__", torch.tensor(info["step"])).item()) != info["step"]:
            raise CheckpointError(f"{directory}: checkpoint weights and JSON disagree on the step")
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False) if dist.is_initialized() else None
        for name, model in self.models.items():
            prefix = f"model/{name}/"
            sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if not sd:
                raise CheckpointError(f"{directory}: no weights for {name!r}")
            if dist.is_initialized():
                set_model_state_dict(model, sd, options=opts)
            else:
                unwrap(model).load_state_dict(sd)
        for name, (model, opt) in self.optimizers.items():
            prefix = f"optim/{name}/"
            state: dict[str, dict[str, torch.Tensor]] = {}
            for k, v in tensors.items():
                if k.startswith(prefix):
                    fqn, key = k[len(prefix):].rsplit("::", 1)
                    state.setdefault(fqn, {})[key] = v
            set_optimizer_state_dict(model, opt, {"state": state, "param_groups": info["param_groups"][name]},
                                     options=opts)
        self.step = info["step"]
        self.extra = info.get("extra", {})
        return True


# --- logging and the loop ----------------------------------------------------------------


class JsonlLog:
    """Append-only JSON lines; reopening at step s drops records after s (they will be redone)."""

    def __init__(self, path: Path, resume_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if rec.get("step", -1) <= resume_step:
                    kept.append(line)
        with atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


ProgressFn = Callable[[int, int, dict[str, float]], None]


def run_loop(
    *,
    stage: str,
    directory: Path,
    loop: LoopConfig,
    state: TrainState,
    ranks: Ranks,
    step_fn: Callable[[int], dict[str, float]],
    meta: dict[str, Any],
    samples_per_step: int,
    on_progress: ProgressFn | None = None,
) -> TrainState:
    """Run optimiser steps [state.step, loop.steps): log, checkpoint, resume."""
    resumed = checkpoint_matches(directory, meta) and state.load(directory)  # not one made from other inputs
    if resumed:
        log.info("%s: resuming at step %d", stage, state.step)
    logger = JsonlLog(directory / "log.jsonl", state.step, ranks.main)
    last_ckpt = state.step
    t0, since = time.perf_counter(), 0
    while state.step < loop.steps:
        step = state.step
        losses = step_fn(step)
        state.step, since = step + 1, since + 1
        if state.step % loop.log_every == 0 or state.step == loop.steps:
            dt = time.perf_counter() - t0
            done, since = since, 0
            losses = ranks.mean(losses)
            rec = {"stage": stage, "step": state.step, **losses,
                   "samples_per_s": samples_per_step * done / max(dt, 1e-9), "time": time.time()}
            logger.write(rec)
            t0 = time.perf_counter()
            if on_progress:
                on_progress(state.step, loop.steps, losses)
        if state.step % loop.ckpt_every == 0 and state.step != last_ckpt:
            state.save(directory, ranks, meta)
            last_ckpt = state.step
    if state.step != last_ckpt or not resumed:
        state.save(directory, ranks, meta)
    ranks.barrier()
    return state


def accumulate(
    model: nn.Module,
    indices: range | list[int],
    grad_accum: int,
    loss_fn: Callable[[list[int]], tuple[torch.Tensor, dict[str, float]]],
    precision: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Backward over this rank's samples in `grad_accum` micro-batches; gradients (and the
    returned logs) are the mean over the samples, as one big batch would give. `precision`
    bfloat16 runs the forwards under autocast (the DiT keeps its fp32 islands)."""
    indices = list(indices)
    per = math.ceil(len(indices) / grad_accum)
    chunks = [indices[i: i + per] for i in range(0, len(indices), per)]
    logs: dict[str, float] = {}
    for j, chunk in enumerate(chunks):
        with no_sync(model, j < len(chunks) - 1), mixed_precision(model, precision):
            loss, parts = loss_fn(chunk)
            (loss * (len(chunk) / len(indices))).backward()
        for k, v in parts.items():
            logs[k] = logs.get(k, 0.0) + v * len(chunk) / len(indices)
    return logs


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    params: list[nn.Parameter],
    optim: OptimConfig,
    loop: LoopConfig,
    step: int,
    ranks: Ranks,
    loss_fn: Callable[[list[int]], tuple[torch.Tensor, dict[str, float]]],
    precision: torch.dtype = torch.float32,
    prefix: str = "",
) -> dict[str, float]:
    """One optimiser step over the global batch: accumulate this rank's share, clip, step.
    Returns the loss logs plus `<prefix>grad_norm` and `<prefix>lr`."""
    logs = accumulate(model, ranks.shard(loop.batch_size), loop.grad_accum, loss_fn, precision)
    lr = lr_at(optim, step, loop.steps)
    logs[f"{prefix}grad_norm"] = optimizer_step(opt, params, optim, lr)
    logs[f"{prefix}lr"] = lr
    return logs


def mixed_precision(model: nn.Module, precision: torch.dtype) -> torch.autocast:
    device = next(unwrap(model).parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=precision == torch.bfloat16)


@contextmanager
def no_sync(model: nn.Module, active: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on micro-batches that are not the last one."""
    if active and hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield
