"""`livetalk::sink_ring_attention` and csrc/: the op against a reference written here, the host build
of the kernel's tile logic against the same reference, opcheck, and the op through torch.export,
AOTInductor and ONNX.

The reference never calls the code it checks: keys are gathered by index rules written out below
(sinks: a prefix of the cache; ring: a prefix from row sink_cap; then the block), the block's keys and
the queries are rotated as complex numbers by angles read back from the tables, and the softmax is
explicit, in float64. The CUDA kernels' source also runs here, under a host SIMT emulation
(csrc/tests/kernel_emu.cpp); on a GPU it runs in scripts/gpu_check_csrc.sh.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from livetalk_cli.errors import UserError
from livetalk_cli.kernels import sink_ring
from livetalk_cli.models.attention import KVWindow, WindowAttention

ROOT = Path(__file__).resolve().parents[1]
OP = torch.ops.livetalk.sink_ring_attention.default


def make_inputs(b=1, nb=24, h=2, d=32, np_=40, sink_cap=16, seg=(16, 24), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    ang = torch.rand(nb, d // 2, generator=g, dtype=torch.float64) * 40.0
    return (rnd(b, nb, h, d), rnd(b, nb, h, d), rnd(b, nb, h, d), rnd(b, np_, h, d), rnd(b, np_, h, d),
            ang.cos().float(), ang.sin().float(), torch.tensor(seg, dtype=torch.int32), sink_cap)


def explicit_reference(q, k, v, kc, vc, cos, sin, seg, sink_cap) -> torch.Tensor:
    """float64: gather by the segment rules, rotate as complex numbers, explicit softmax."""
    n_sink, n_ring = int(seg[0]), int(seg[1])
    rows = list(range(n_sink)) + [sink_cap + i for i in range(n_ring)]
    rot = torch.polar(torch.ones_like(cos, dtype=torch.float64), torch.atan2(sin.double(), cos.double()))

    def rotate(x):  # (B, L, H, D): pairs (2i, 2i+1) as complex numbers times e^{i angle}
        z = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
        return torch.view_as_real(z * rot[None, :, None, :]).flatten(-2)

    keys = torch.cat([kc.double()[:, rows], rotate(k)], dim=1)
    values = torch.cat([vc.double()[:, rows], v.double()], dim=1)
    scores = torch.einsum("blhd,bmhd->bhlm", rotate(q), keys) / math.sqrt(q.shape[-1])
    return torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), values)


SEGS = [(0, 0), (8, 0), (16, 8), (16, 24), (3, 17)]  # empty, sinks filling, ring filling, full, odd lengths


@pytest.mark.parametrize("seg", SEGS)
def test_op_equals_the_explicit_reference(seg):
    args = make_inputs(seg=seg)
    torch.testing.assert_close(OP(*args).double(), explicit_reference(*args), atol=1e-5, rtol=1e-5)


def test_op_in_bf16_and_fp16_is_close_to_the_fp64_reference():
    for dtype, tol in ((torch.bfloat16, 3e-2), (torch.float16, 4e-3)):
        args = make_inputs(dtype=dtype, seg=(16, 16))
        got = OP(*args)
        assert got.dtype == dtype
        err = (got.double() - explicit_reference(*args)).abs().max().item()
        assert err < tol, (dtype, err)


def test_the_reference_sees_a_wrong_segment():
    """The check has signal: one ring token more or less changes the result."""
    args = make_inputs(seg=(16, 8))
    want = explicit_reference(*args)
    wrong = list(args)
    wrong[7] = torch.tensor([16, 9], dtype=torch.int32)
    assert (OP(*wrong).double() - want).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    for seg in ((0, 0), (16, 24), (5, 11)):
        torch.library.opcheck(OP, make_inputs(seg=seg, dtype=dtype))


def test_bad_arguments_are_one_line_errors():
    args = list(make_inputs())
    bad_seg = list(args)
    bad_seg[7] = torch.tensor([17, 0], dtype=torch.int32)  # more sinks than the sinks hold
    with pytest.raises(ValueError, match=r"seg \[17, 0\] outside"):
        OP(*bad_seg)
    bad_dtype = list(args)
    bad_dtype[7] = torch.tensor([1, 1])
    with pytest.raises(ValueError, match="seg must be int32"):
        OP(*bad_dtype)
    bad_cache = list(args)
    bad_cache[3] = bad_cache[3][..., :16]
    with pytest.raises(ValueError, match="k_cache, v_cache must be"):
        OP(*bad_cache)


def test_segments_from_a_cache_mask():
    mask = torch.zeros(1, 1, 1, 40 + 24, dtype=torch.bool)
    mask[..., :8] = True  # 8 of 16 sinks
    mask[..., 16:28] = True  # 12 of 24 ring tokens
    mask[..., 40:] = True  # the block
    assert sink_ring.segments(mask, 16, 40).tolist() == [8, 12]


def test_resolve_backend():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert sink_ring.resolve_backend("auto", cpu, torch.bfloat16, 128) == "sdpa"
    assert sink_ring.resolve_backend("csrc", cpu, torch.float32, 32) == "csrc"  # the op's reference
    assert sink_ring.resolve_backend("flex", cpu, torch.float32, 32) == "flex"
    with pytest.raises(UserError, match="unknown attention backend 'fused'"):
        sink_ring.resolve_backend("fused", cpu, torch.float32, 32)
    if not sink_ring.cuda_kernel_available():
        assert sink_ring.resolve_backend("auto", cuda, torch.bfloat16, 128) == "sdpa"
        with pytest.raises(UserError, match="csrc extension is not built"):
            sink_ring.resolve_backend("csrc", cuda, torch.bfloat16, 128)


# --- the host build of the kernel's tile logic -----------------------------------------------------
def build_host_program(tmp_path_factory, name: str, *flags: str) -> Path:
    """csrc/tests/NAME.cpp built with the machine's C++ compiler, warnings as errors."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path_factory.mktemp("csrc") / name
    subprocess.run([cxx, *flags, "-O2", "-Wall", "-Werror", f"-I{ROOT / 'csrc/include'}",
                    str(ROOT / f"csrc/tests/{name}.cpp"), "-o", str(exe)], check=True)
    return exe


@pytest.fixture(scope="module")
def tile_host(tmp_path_factory) -> Path:
    return build_host_program(tmp_path_factory, "tile_host", "-std=c++17")


def run_tile_host(exe: Path, tmp: Path, args, splits: int) -> torch.Tensor:
    q, k, v, kc, vc, cos, sin, seg, sink_cap = args
    b, nb, h, d = q.shape
    header = torch.tensor([b, nb, h, d, kc.shape[1], sink_cap, int(seg[0]), int(seg[1]), splits], dtype=torch.int32)
    blob = header.numpy().tobytes() + b"".join(t.float().contiguous().numpy().tobytes()
                                               for t in (q, k, v, kc, vc, cos, sin))
    (tmp / "in.bin").write_bytes(blob)
    subprocess.run([str(exe), "attention", str(tmp / "in.bin"), str(tmp / "out.bin")], check=True)
    out = torch.frombuffer(bytearray((tmp / "out.bin").read_bytes()), dtype=torch.float32)
    return out.reshape(b, nb, h, d)


@pytest.mark.parametrize("seg", SEGS)
def test_host_tile_logic_equals_the_reference(tile_host, tmp_path, seg):
    """Query and key tiles of 64 over 2 heads x 100 queries x (cache 140 + block 100) keys: tiles
    straddle the sink/ring/block borders, and splits 1, 3 and 16 (some of them empty) combine."""
    args = make_inputs(b=2, nb=100, h=2, d=32, np_=140, sink_cap=60, seg=seg, seed=3)
    want = explicit_reference(*args)
    for splits in (1, 3, 16):
        got = run_tile_host(tile_host, tmp_path, args, splits)
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5, msg=f"splits {splits}")


def test_host_layout_covers_every_key_once(tile_host):
    for sink_len, ring_len, splits in ((0, 0, 1), (9, 0, 2), (9, 30, 5), (60, 80, 16)):
        out = subprocess.run([str(tile_host), "layout", str(sink_len), str(ring_len), "60", "140", "100",
                              str(splits)], check=True, capture_output=True, text=True).stdout.split("\n")
        keys = [tuple(map(int, line.split()[2:])) for line in out if line.startswith("key")]
        want = [(0, i) for i in range(sink_len)] + [(0, 60 + i) for i in range(ring_len)] + [(1, i) for i in range(100)]
        assert keys == want
        ranges = [tuple(map(int, line.split()[2:])) for line in out if line.startswith("split")]
        covered = [j for lo, hi in ranges for j in range(lo, hi)]
        assert covered == list(range(len(want)))  # in order, each key once
        assert all(lo % 64 == 0 for lo, hi in ranges if hi > lo)  # splits start on tile borders


# --- the CUDA kernels' own source under a host SIMT emulation ---------------------------------------
@pytest.fixture(scope="module")
def kernel_emu(tmp_path_factory) -> Path:
    return build_host_program(tmp_path_factory, "kernel_emu", "-std=c++20", "-pthread", "-Wno-unknown-pragmas")


EMU_CASES = {
    "pipelined": [(32, seg, sms) for seg in ((0, 0), (30, 50), (60, 80)) for sms in (1, 16)]
    + [(128, (30, 50), 1), (128, (60, 80), 16)],
    "simple": [(32, (30, 50), 16), (128, (60, 80), 1)],
}


@pytest.mark.parametrize("variant", ["pipelined", "simple"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_cuda_kernel_source_under_host_emulation_equals_the_reference(kernel_emu, tmp_path, dtype, variant):
    """sink_ring_kernel.cuh as C++: one OS thread per CUDA thread, __syncthreads and the warp collectives
    as barriers, mma.sync from the PTX ISA's fragment layouts (written out in kernel_emu.cpp). Two
    batches x 2 heads x 100 queries (a full and a partial query tile) over up to 140 cached keys; 16
    emulated SMs give 4 splits of the keys (one of them empty), 1 SM one. The reference gets the same
    bf16/fp16-rounded inputs; what is left is the kernel's own rounding of the rotated q/k and of P
    (relative L2 3e-3 in bf16, 4e-4 in fp16 when written), against limits of 1e-2 and 1.5e-3. The
    pipelined variant's cp.async copies land only at the wait that covers them. Kernels with P's
    fragments swapped, V's fragment rows swapped, a row-max shuffle missing, the cp.async wait
    missing or one group off, or the next tile written into the current buffer score 0.4-0.8."""
    torch_dtype, limit = {"bf16": (torch.bfloat16, 1e-2), "fp16": (torch.float16, 1.5e-3)}[dtype]
    for d, seg, sms in EMU_CASES[variant]:
        args = make_inputs(b=2, nb=100, h=2, d=d, np_=140, sink_cap=60, seg=seg, seed=d + seg[0])
        args = tuple(a.to(torch_dtype).float() if isinstance(a, torch.Tensor) and a.dim() == 4 else a for a in args)
        q, k, v, kc, vc, cos, sin, _, sink_cap = args
        header = torch.tensor([2, 100, 2, d, 140, sink_cap, *seg, 0], dtype=torch.int32)
        (tmp_path / "in.bin").write_bytes(header.numpy().tobytes() + b"".join(
            t.contiguous().numpy().tobytes() for t in (q, k, v, kc, vc, cos, sin)))
        subprocess.run([str(kernel_emu), str(tmp_path / "in.bin"), str(tmp_path / "out.bin"), dtype, str(sms),
                        variant], check=True)
        raw = (tmp_path / "out.bin").read_bytes()
        got = torch.frombuffer(bytearray(raw[:-4]), dtype=torch.float32).reshape(q.shape).double()
        splits = int(torch.frombuffer(bytearray(raw[-4:]), dtype=torch.int32)[0])
        assert splits == (4 if sms == 16 else 1)
        want = explicit_reference(*args)
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < limit, (d, seg, sms, rel)


# --- through torch.export, AOTInductor and ONNX ----------------------------------------------------
class Block(torch.nn.Module):
    """One block's attention over a cache window with the csrc backend (inputs: q, k, v, window)."""

    def __init__(self, sink_tokens: int):
        super().__init__()
        self.sink_tokens = sink_tokens

    def forward(self, q, k, v, past_k, past_v, cos, sin, mask):
        window = KVWindow(past_k, past_v, cos, sin, mask, backend="csrc", sink_tokens=self.sink_tokens)
        return WindowAttention(window)(0, q, k, v)


def block_inputs():
    q, k, v, kc, vc, cos, sin, _, sink_cap = make_inputs(nb=24, np_=40, sink_cap=16)
    mask = torch.ones(1, 1, 1, 64, dtype=torch.bool)
    mask[..., 8:16] = False  # sinks half full
    mask[..., 28:40] = False  # ring half full
    return (q, k, v, kc[None], vc[None], cos, sin, mask), (q, k, v, kc, vc, cos, sin,
                                                          torch.tensor([8, 12], dtype=torch.int32), sink_cap)


@torch.no_grad()
def test_window_attention_csrc_computes_seg_from_the_mask():
    inputs, op_args = block_inputs()
    torch.testing.assert_close(Block(16)(*inputs).double(), explicit_reference(*op_args), atol=1e-5, rtol=1e-5)


def test_torch_export_keeps_the_op_and_aotinductor_calls_it(tmp_path):
    """Exported with autograd on (as torch.export runs) and run on another cache state than the example's."""
    inputs, _ = block_inputs()
    module = Block(16).eval()
    ep = torch.export.export(module, inputs)
    assert sum(n.target is OP for n in ep.graph.nodes) == 1
    pkg = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "block.pt2"))
    run = torch._inductor.aoti_load_package(pkg)
    with torch.no_grad():
        torch.testing.assert_close(run(*inputs), module(*inputs), atol=1e-5, rtol=1e-5)
        other = list(inputs)
        other[7] = torch.ones_like(inputs[7])  # the full window
        got, want = run(*other), module(*other)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert (want - module(*inputs)).abs().max() > 1e-2  # the two states differ


@torch.no_grad()
def test_onnx_export_is_one_typed_custom_node(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    inputs, _ = block_inputs()
    inputs = tuple(t.to(torch.bfloat16) if t.dtype == torch.float32 and t.dim() == 4 else t for t in inputs)
    path = tmp_path / "block.onnx"
    torch.onnx.export(Block(16).eval(), inputs, str(path), dynamo=True, opset_version=20)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    nodes = [n for n in model.graph.node if n.op_type == "SinkRingAttention"]
    assert len(nodes) == 1 and nodes[0].domain == "livetalk"
    assert {a.name: a.i for a in nodes[0].attribute} == {"sink_cap": 16}
    assert len(nodes[0].input) == 8
    assert {o.domain: o.version for o in model.opset_import}.get("livetalk") == 1
    out = model.graph.output[0].type.tensor_type
    assert out.elem_type == onnx.TensorProto.BFLOAT16
    assert [dim.dim_value for dim in out.shape.dim] == [1, 24, 2, 32]
