"""Build and run one component in each format: ONNX (ONNX Runtime), AOTInductor (`*.pt2`) and, in
`tensorrt.py`, TensorRT plans. Every runtime is an `Engine`: positional tensors in contract order
in, a tuple of tensors in contract order out, fresh tensors the caller may keep.

Why these: `torch.onnx.export(dynamo=True)` is torch's maintained exporter (onnxscript), opset 20
keeps SDPA as MatMul/Softmax, which ONNX Runtime's CPU provider and TensorRT both take; AOTInductor
is torch's own ahead-of-time path (no Python model code at run time, CPU and CUDA).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from livetalk_cli.errors import UserError
from livetalk_cli.export.contract import DTYPES, Component, Contract

log = logging.getLogger(__name__)

OPSET = 20
FORMATS = ("onnx", "aoti", "trt", "trt-rtx")
RUNNABLE = ("eager", "onnx", "aoti", "trt")  # trt-rtx plans are built here, run on RTX GPUs only


class Engine(Protocol):
    contract: Contract

    def __call__(self, *inputs: Tensor) -> tuple[Tensor, ...]: ...


def require(module: str, extra: str, what: str) -> None:
    """One line naming the extra when an optional dependency is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(f"{what} needs {module}: pip install 'livetalk[{extra}]'")


def check_inputs(contract: Contract, inputs: tuple[Tensor, ...]) -> None:
    if len(inputs) != len(contract.inputs):
        raise ValueError(f"{contract.component}: {len(contract.inputs)} inputs expected, got {len(inputs)}")
    for spec, t in zip(contract.inputs, inputs, strict=True):
        spec.check(t, contract.component)


class EagerEngine:
    """The component's PyTorch module itself (the reference every built engine is checked against)."""

    def __init__(self, component: Component):
        self.contract, self.module = component.contract, component.module

    @torch.no_grad()
    def __call__(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        out = self.module(*inputs)
        return out if isinstance(out, tuple) else (out,)


# --- ONNX / ONNX Runtime -------------------------------------------------------------------------
def export_onnx(component: Component, path: Path) -> None:
    """The component as an ONNX file (opset 20, weights inside the file)."""
    require("onnxscript", "onnx", "ONNX export")
    c = component.contract
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(component.module, component.example, dynamo=True, opset_version=OPSET,
                                    input_names=c.input_names, output_names=c.output_names, optimize=True,
                                    verbose=False, report=False)
    assert program is not None
    program.save(str(path))


class OrtEngine:
    """An ONNX file run by ONNX Runtime (CPU provider on CPU, CUDA provider on a CUDA device).

    On a CPU, ONNX Runtime's thread pool is its own (not torch's OpenMP team): a call runs in a
    session with as many threads as torch's intra-op setting of the calling thread (the stream's
    team size), one session per count, made on first use, and its idle threads do not spin.
    """

    def __init__(self, path: Path, contract: Contract, device: torch.device):
        require("onnxruntime", "onnx", "the ONNX Runtime engine")
        self.contract, self.device, self.path = contract, device, path
        self._sessions: dict[int, Any] = {}
        self._session(torch.get_num_threads() if device.type == "cpu" else 0)  # a corrupt file fails here

    def _session(self, threads: int) -> Any:
        if threads not in self._sessions:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            # idle pool threads spin by default: beside torch's own OpenMP team (the eager side of a
            # stream) that spinning takes the cores the team waits for
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            providers = ["CUDAExecutionProvider"] if self.device.type == "cuda" else ["CPUExecutionProvider"]
            try:
                session = ort.InferenceSession(str(self.path), opts, providers=providers)
            except Exception as e:  # onnxruntime raises its own types for a corrupt file
                raise UserError(f"cannot load ONNX model {self.path}: {str(e).splitlines()[0][:200]}") from None
            names = [i.name for i in session.get_inputs()]
            if names != self.contract.input_names:
                raise UserError(f"{self.path}: inputs {names} do not match the manifest's contract "
                                f"{self.contract.input_names}")
            self._sessions[threads] = session
        return self._sessions[threads]

    def __call__(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        check_inputs(self.contract, inputs)
        if self.device.type == "cpu":
            session = self._session(torch.get_num_threads())
            feeds = {n: t.detach().contiguous().numpy() for n, t in zip(self.contract.input_names, inputs,
                                                                        strict=True)}
            return tuple(torch.from_numpy(o) for o in session.run(None, feeds))
        return self._run_bound(inputs)

    def _run_bound(self, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """CUDA: inputs and preallocated outputs bound by address (no host copies)."""
        import numpy as np

        session = self._session(0)
        binding = session.io_binding()
        np_types = {torch.float32: np.float32, torch.float16: np.float16, torch.bool: np.bool_,
                    torch.int64: np.int64}
        idx = self.device.index or 0
        dtypes = {t.dtype for t in inputs} | {DTYPES[s.dtype] for s in self.contract.outputs}
        missing = sorted(str(d) for d in dtypes - set(np_types))
        if missing:
            raise UserError(f"{self.path}: ONNX Runtime's CUDA binding takes no {', '.join(missing)} tensors; "
                            "use --engine-backend aoti or trt for this dtype")
        for spec, t in zip(self.contract.inputs, inputs, strict=True):
            t = t.contiguous()
            binding.bind_input(spec.name, "cuda", idx, np_types[t.dtype], list(t.shape), t.data_ptr())
        outs = [torch.empty(s.shape, dtype=DTYPES[s.dtype], device=self.device) for s in self.contract.outputs]
        for spec, t in zip(self.contract.outputs, outs, strict=True):
            binding.bind_output(spec.name, "cuda", idx, np_types[t.dtype], list(t.shape), t.data_ptr())
        torch.cuda.current_stream().synchronize()
        session.run_with_iobinding(binding)
        return tuple(outs)


# --- AOTInductor ---------------------------------------------------------------------------------
def export_aoti(component: Component, path: Path) -> None:
    """The component compiled ahead of time by inductor into a `.pt2` package."""
    with torch.no_grad(), component.aoti_mode():
        program = torch.export.export(component.module, component.example, strict=False)
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))


class AotiEngine:
    """A `.pt2` package. On a CPU it runs through the model's C ABI, which releases the GIL (torch's
    Python runner holds it for a whole call and stalls a pipeline's other thread: `aoti_cabi`)."""

    def __init__(self, path: Path, contract: Contract, device: torch.device):
        import livetalk_cli.kernels.sink_ring  # noqa: F401  (the op a --attention csrc package calls)
        from livetalk_cli.export.aoti_cabi import cabi_runner

        self.contract = contract
        self.cabi = cabi_runner(path) if device.type == "cpu" else None
        if self.cabi is not None:
            return
        try:
            self.runner = torch._inductor.aoti_load_package(str(path))
        except Exception as e:
            raise UserError(f"cannot load AOTInductor package {path}: {str(e).splitlines()[0][:200]}") from None

    def __call__(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        check_inputs(self.contract, inputs)
        if self.cabi is not None:
            return tuple(self.cabi([t.contiguous() for t in inputs]))
        out = self.runner(*inputs)
        return (out,) if isinstance(out, Tensor) else tuple(out)


def artifact_name(fmt: str) -> str:
    """The file a format's artifact has in a component folder (TensorRT plans are named by version
    and GPU: see `tensorrt.plan_name`)."""
    return {"onnx": "model.onnx", "aoti": "model.pt2"}[fmt]


def file_size(path: Path) -> int:
    return os.stat(path).st_size
