"""TensorRT plans (`livetalk_cli.export.tensorrt`).

On CPU: TensorRT-RTX builds every tiny component for sm 89 without a GPU (building is the proof the
ONNX files are accepted; running needs an RTX GPU), and every failure is a one-line `UserError`.
With `tensorrt` and a CUDA GPU: full TensorRT plans run through `TrtEngine` and equal eager PyTorch.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from livetalk_cli.errors import UserError
from livetalk_cli.export.backends import export_onnx
from livetalk_cli.export.contract import COMPONENTS, Component, Contract, TensorSpec, components
from livetalk_cli.export.tensorrt import FLAVORS, TrtEngine, build_plan, import_tensorrt, plan_name, trt_version
from livetalk_cli.pipeline import load_model
from livetalk_cli.runtime.threads import intra_op_threads

MALFORMED_ENGINE = 32  # tensorrt_rtx.EngineInvalidityDiagnostics.MALFORMED_ENGINE


def one_line_user_error(excinfo: pytest.ExceptionInfo[UserError]) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def rtx():
    return pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed: pip install "
                                                      "'livetalk[tensorrt-rtx]'")


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> dict[str, tuple[Component, Path]]:
    """The tiny preset's four components (random weights) and their ONNX files, exported once."""
    pytest.importorskip("onnxscript", reason="the [onnx] extra is not installed")
    root = tmp_path_factory.mktemp("onnx")
    model = load_model(random_weights=True, preset_name="tiny", device="cpu")
    comps = components(model.cfg, model.dit, model.vae)
    out = {}
    with intra_op_threads(2):
        for name, comp in comps.items():
            export_onnx(comp, root / f"{name}.onnx")
            out[name] = (comp, root / f"{name}.onnx")
    return out


def test_plan_names_say_flavor_version_and_gpu():
    assert FLAVORS == ("trt", "trt-rtx")
    assert plan_name("trt", "10.13.3.9", "89") == "engine_trt10.13.3.9_sm89.plan"
    assert plan_name("trt-rtx", "1.7.1.116", "120") == "engine_trtrtx1.7.1.116_sm120.plan"
    assert plan_name("trt", "11.0.0", "sm_9.0") == "engine_trt11.0.0_sm90.plan"
    assert plan_name("trt", "10.0", "90").removesuffix(".plan").rsplit("_sm", 1)[1] == "90"  # build.py's parse
    with pytest.raises(ValueError):
        plan_name("onnx", "1", "89")


def test_missing_tensorrt_names_the_extra():
    try:
        importlib.import_module("tensorrt")
    except ImportError:
        pass
    else:
        pytest.skip("tensorrt is installed")
    with pytest.raises(UserError) as e:
        import_tensorrt("trt")
    assert "livetalk[tensorrt]" in one_line_user_error(e)
    with pytest.raises(UserError):
        trt_version("trt")


def test_rtx_builds_every_tiny_component_for_sm89(rtx, tiny_onnx, tmp_path):
    class Silent(rtx.ILogger):  # the header probe complains on stderr when there is no GPU
        def __init__(self) -> None:
            rtx.ILogger.__init__(self)

        def log(self, severity, msg) -> None:
            pass

    runtime = rtx.Runtime(Silent())
    header = max(int(runtime.engine_header_size), 64)
    assert trt_version("trt-rtx") == rtx.__version__
    for name in COMPONENTS:
        comp, onnx = tiny_onnx[name]
        out = tmp_path / name
        out.mkdir()
        plan = build_plan(onnx, comp.contract, out, flavor="trt-rtx", sm="89", timing_cache=out / "timing.cache")
        assert plan == out / plan_name("trt-rtx", rtx.__version__, "89")
        assert [p.name for p in out.iterdir()] == [plan.name]  # no temporaries; RTX keeps no timing cache
        assert plan.stat().st_size > 100_000, (name, plan.stat().st_size)
        _, diagnostics = runtime.get_engine_validity(plan.read_bytes()[:header])
        assert not int(diagnostics) & MALFORMED_ENGINE, (name, diagnostics)
    _, diagnostics = runtime.get_engine_validity(tiny_onnx["vae_step"][1].read_bytes()[:header])
    assert int(diagnostics) & MALFORMED_ENGINE  # the check tells a plan from anything else


def test_rtx_refuses_a_gpu_it_cannot_build_for(rtx, tiny_onnx, tmp_path):
    comp, onnx = tiny_onnx["vae_first"]
    with pytest.raises(UserError) as e:
        build_plan(onnx, comp.contract, tmp_path, flavor="trt-rtx", sm="90", timing_cache=None)
    msg = one_line_user_error(e)
    assert "sm90" in msg and "89" in msg
    assert not list(tmp_path.iterdir())


def test_corrupt_onnx_is_a_one_line_user_error(rtx, tiny_onnx, tmp_path):
    comp, onnx = tiny_onnx["vae_first"]
    bad = tmp_path / "model.onnx"
    bad.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError) as e:
        build_plan(bad, comp.contract, out, flavor="trt-rtx", sm="89", timing_cache=None)
    msg = one_line_user_error(e)
    assert str(bad) in msg and "parse" in msg
    assert not list(out.iterdir())
    with pytest.raises(UserError) as e:
        build_plan(tmp_path / "absent.onnx", comp.contract, out, flavor="trt-rtx", sm="89", timing_cache=None)
    assert "absent.onnx" in one_line_user_error(e)


def test_a_file_that_is_not_a_plan_is_refused(rtx, tmp_path):
    contract = Contract("toy", (TensorSpec("z", (1, 4), "float32"),), (TensorSpec("y", (1, 4), "float32"),))
    junk = tmp_path / "engine.plan"
    junk.write_bytes(b"\x00" * 4096)
    with pytest.raises(UserError) as e:
        TrtEngine(junk, contract, torch.device("cpu"), flavor="trt-rtx")
    assert one_line_user_error(e).startswith(f"cannot load TensorRT plan {junk}")
    with pytest.raises(UserError) as e:
        TrtEngine(tmp_path / "absent.plan", contract, torch.device("cpu"), flavor="trt-rtx")
    assert "cannot load TensorRT plan" in one_line_user_error(e)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="full TensorRT builds and runs on a CUDA GPU")
def test_trt_plans_equal_eager_on_the_gpu(tiny_onnx, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed: pip install 'livetalk[tensorrt]'")
    device = torch.device("cuda")
    for name in ("dit_denoise", "vae_step"):
        comp, onnx = tiny_onnx[name]
        out = tmp_path / name
        out.mkdir()
        plan = build_plan(onnx, comp.contract, out, flavor="trt", sm=None, timing_cache=out / "timing.cache")
        assert (out / "timing.cache").is_file()
        engine = TrtEngine(plan, comp.contract, device, flavor="trt")
        with torch.no_grad():
            ref = comp.module(*comp.example)
        ref = ref if isinstance(ref, tuple) else (ref,)
        first = engine(*[t.to(device) for t in comp.example])
        kept = [t.clone() for t in first]
        engine(*[torch.zeros_like(t).to(device) if t.is_floating_point() else t.to(device) for t in comp.example])
        for o, k, r in zip(first, kept, ref, strict=True):
            assert torch.equal(o, k)  # outputs are the caller's: a later call leaves them alone
            rel = ((o.float().cpu() - r.float()).norm() / r.float().norm().clamp_min(1e-12)).item()
            assert rel < 1e-2, (name, rel)
        cut = out / "cut.plan"
        cut.write_bytes(plan.read_bytes()[: plan.stat().st_size // 2])
        with pytest.raises(UserError) as e:
            TrtEngine(cut, comp.contract, device, flavor="trt")
        assert "cannot load TensorRT plan" in one_line_user_error(e)
