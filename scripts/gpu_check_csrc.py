"""The Python half of the csrc kernel's GPU checks; scripts/gpu_check_csrc.sh builds the extension
and the C++ harness first and runs both (one device call, about 7 minutes on an H200):

    LIVETALK_CUDA_ARCHS=90 python3 setup.py build_ext --inplace   # livetalk_cli/_csrc*.so
    python3 scripts/gpu_check_csrc.py --out OUT/     # parity, timing, then `bench` with/without

1. Parity of `livetalk::sink_ring_attention` (the CUDA kernel) against its reference (SDPA over the
   gathered segments, fp32, same inputs) through a stream of blocks committed to a real
   `BlockKVCache` at the tiny, demo and 1.3B geometries: sinks filling, the ring filling, then
   several ring wraps, both RoPE modes; bf16 and fp16. Tolerances (relative L2 of the output):
   bf16 2e-2, fp16 4e-3 (one rounding of q, k, v, P to 8 or 11 bits of mantissa; fp32 accumulation).
2. Time per call at the 1.3B shape (12 heads x 128, 1024 tokens per frame, 3-frame block, full
   15-frame window): the csrc op, the SDPA backend (rope + cat + masked SDPA, as `WindowAttention`
   runs it), SDPA alone with and without the mask, FlexAttention (compiled) with a block mask.
   TFLOP/s = 4 * H * Nb * keys * D / time, against the measured bf16 matmul rate (8192^3).
3. `livetalk bench` FPS of omniavatar-1.3b 512x512, random weights, bf16, --attention sdpa vs csrc.

Writes OUT/csrc_gpu.json; prints every figure. Exit 1 if a parity check fails. `--dry-run` runs
the same code on the CPU at the tiny and demo geometries (the op's reference against itself, no
FlexAttention, no bench), to check the script without a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from livetalk_cli.config import preset  # noqa: E402
from livetalk_cli.kernels import sink_ring  # noqa: E402
from livetalk_cli.models.attention import WindowAttention  # noqa: E402
from livetalk_cli.models.rope import apply_rope  # noqa: E402
from livetalk_cli.sampling.kv_cache import BlockKVCache  # noqa: E402

OP = torch.ops.livetalk.sink_ring_attention.default
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


DEV = "cuda"


def parity(name: str, dtype: torch.dtype, relative: bool, blocks: int) -> dict:
    cfg = preset(name)
    dit = dataclasses.replace(cfg.dit, num_layers=1)
    stream = dataclasses.replace(cfg.stream, relative_rope=relative)
    h, w = cfg.latent_hw
    grid = (h // dit.patch_size[1], w // dit.patch_size[2])
    cache = BlockKVCache(dit, stream, grid, device=DEV, dtype=dtype, attention="csrc")
    nb = stream.block_frames * grid[0] * grid[1]
    g = torch.Generator(device=DEV).manual_seed(0)
    worst, errs = 0.0, []
    for _ in range(blocks):
        q, k, v = (torch.randn(1, nb, dit.num_heads, dit.head_dim, device=DEV, generator=g).to(dtype)
                   for _ in range(3))
        win = cache.window()
        args = (q, k, v, win.k[0], win.v[0], win.cos, win.sin, cache.seg, win.sink_tokens)
        got = OP(*args)
        ref = sink_ring.gathered_reference(*(a.float() if torch.is_tensor(a) and a.is_floating_point() else a
                                             for a in args))
        err = rel_l2(got, ref)
        errs.append(err)
        worst = max(worst, err)
        cache.commit(k[None], v[None])
    ok = worst <= TOL[dtype]
    row = {"preset": name, "dtype": str(dtype).removeprefix("torch."), "relative_rope": relative, "blocks": blocks,
           "seg_last": cache.seg.tolist(), "rel_l2_max": worst, "rel_l2_per_block": errs, "ok": ok}
    print(f"parity {name:16s} {row['dtype']:8s} relative={relative!s:5s} rel_l2 max {worst:.2e} "
          f"({'ok' if ok else 'FAIL'})", flush=True)
    return row


def cuda_time(fn, iters: int = 30) -> float:
    """Median µs of fn() over iters calls (CUDA events; the host clock on a CPU), after 5 warm-up calls."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        if DEV != "cuda":
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
            continue
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000)
    times.sort()
    return times[len(times) // 2]


def matmul_peak() -> float:
    n = 8192 if DEV == "cuda" else 1024
    x = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    us = cuda_time(lambda: x @ x, 20 if DEV == "cuda" else 3)
    return 2 * n**3 / (us * 1e-6) / 1e12


def timing(name: str = "omniavatar-1.3b") -> dict:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    cfg = preset(name)
    dit = dataclasses.replace(cfg.dit, num_layers=1)
    h, w = cfg.latent_hw
    grid = (h // dit.patch_size[1], w // dit.patch_size[2])
    dtype = torch.bfloat16
    cache = BlockKVCache(dit, cfg.stream, grid, device=DEV, dtype=dtype, attention="csrc")
    nb = cfg.stream.block_frames * grid[0] * grid[1]
    hh, d = dit.num_heads, dit.head_dim
    g = torch.Generator(device=DEV).manual_seed(1)
    while not cache.full:
        cache.commit(*(torch.randn(1, 1, nb, hh, d, device=DEV, generator=g).to(dtype) for _ in range(2)))
    q, k, v = (torch.randn(1, nb, hh, d, device=DEV, generator=g).to(dtype) for _ in range(3))
    win = cache.window()
    keys = win.k.shape[2] + nb
    flops = 4 * hh * nb * keys * d
    masked = dataclasses.replace(win, mask=cache.mask, backend="sdpa")  # the SDPA backend before the cache is full
    qt = apply_rope(q, win.cos, win.sin).transpose(1, 2)
    kt = torch.cat([win.k[0], apply_rope(k, win.cos, win.sin)], 1).transpose(1, 2).contiguous()
    vt = torch.cat([win.v[0], v], 1).transpose(1, 2).contiguous()
    mask = cache.mask.clone()
    valid = mask.reshape(-1)
    bm = create_block_mask(lambda b, h_, qi, kv: valid[kv], None, None, nb, keys, device=DEV) if DEV == "cuda" else None
    flex = torch.compile(flex_attention, dynamic=False)
    peak = matmul_peak()
    cases = {
        "csrc op": lambda: OP(q, k, v, win.k[0], win.v[0], win.cos, win.sin, cache.seg, win.sink_tokens),
        "sdpa backend, masked (rope + cat + SDPA)": lambda: WindowAttention(masked)(0, q, k, v),
        "sdpa backend, full (rope + cat + SDPA)": lambda: WindowAttention(dataclasses.replace(win, backend="sdpa"))(
            0, q, k, v),
        "SDPA alone, with mask": lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask),
        "SDPA alone, no mask": lambda: F.scaled_dot_product_attention(qt, kt, vt),
    }
    if DEV == "cuda":
        cases["FlexAttention (compiled, block mask)"] = lambda: flex(qt, kt, vt, block_mask=bm)
    rows = {}
    with torch.no_grad():
        for name, fn in cases.items():
            us = cuda_time(fn, 30 if DEV == "cuda" else 3)
            tf = flops / (us * 1e-6) / 1e12
            rows[name] = {"us": us, "tflops": tf, "of_matmul_peak": tf / peak}
            print(f"time  {name:42s} {us:9.1f} us  {tf:6.1f} TFLOP/s  {100 * tf / peak:5.1f} % of matmul",
                  flush=True)
    csrc, ref = rows["csrc op"]["us"], rows["sdpa backend, masked (rope + cat + SDPA)"]["us"]
    print(f"speed-up of csrc over the masked SDPA backend: {ref / csrc:.2f}x (goal >= 1.5x)", flush=True)
    return {"shape": {"heads": hh, "head_dim": d, "block_tokens": nb, "keys": keys}, "flops_per_call": flops,
            "matmul_peak_tflops": peak, "rows": rows, "speedup_vs_masked_sdpa": ref / csrc}


def bench(out: Path) -> dict:
    res = {}
    for att in ("sdpa", "csrc"):
        path = out / f"bench_{att}.json"
        cmd = [sys.executable, "-m", "livetalk_cli", "bench", "--preset", "omniavatar-1.3b", "--random-weights",
               "--device", "cuda", "--dtype", "bfloat16", "--attention", att, "--speed-only", "--repeats", "2",
               "--stream-minutes", "0", "--json", str(path)]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        print(f"bench --attention {att}: rc {proc.returncode} in {time.time() - t0:.0f} s", flush=True)
        print(proc.stdout[-2500:], proc.stderr[-1500:], flush=True)
        res[att] = json.loads(path.read_text()) if path.exists() else {"rc": proc.returncode}
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny and demo geometries, no bench")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    global DEV
    if a.dry_run:
        DEV, a.skip_bench = "cpu", True
    elif not sink_ring.cuda_kernel_available():
        print("the csrc extension is not built: LIVETALK_CUDA_ARCHS=90 python3 setup.py build_ext --inplace")
        return 1
    report: dict = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (dry run)",
                    "torch": torch.__version__, "parity": []}
    shapes = (("tiny", 8), ("demo", 8)) + ((("omniavatar-1.3b", 6),) if DEV == "cuda" else ())
    for name, blocks in shapes:
        for dtype in (torch.bfloat16, torch.float16):
            for relative in (False, True):
                report["parity"].append(parity(name, dtype, relative, blocks))
    report["timing"] = timing("omniavatar-1.3b" if DEV == "cuda" else "demo")
    if not a.skip_bench:
        report["bench"] = bench(a.out)
    (a.out / "csrc_gpu.json").write_text(json.dumps(report, indent=1, default=str))
    ok = all(r["ok"] for r in report["parity"])
    print("parity:", "all ok" if ok else "FAILED", "| wrote", a.out / "csrc_gpu.json")
    return 0 if ok and math.isfinite(report["timing"]["speedup_vs_masked_sdpa"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
