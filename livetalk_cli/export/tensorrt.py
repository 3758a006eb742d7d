"""TensorRT plans of the exported components: built from the component's ONNX file, run by `TrtEngine`.

Two flavors, both optional extras imported lazily:
* `trt`     full TensorRT (`tensorrt`, 10 or 11). Builds need the GPU the plan is for: the plan holds
            kernels timed on it. A timing cache file speeds up rebuilds.
* `trt-rtx` TensorRT-RTX (`tensorrt_rtx`, pip `tensorrt-rtx`). Builds need no GPU: the target compute
            capability is set on the builder config (`num_compute_capabilities` and
            `set_compute_capability(ComputeCapability.SM89, 0)`); kernels are compiled when the plan is
            loaded on an RTX GPU. It has no builder timing cache (those calls are no-ops there).

Both builds are strongly typed: precision comes from the ONNX file's dtypes (TensorRT 11 has no
other mode; on TensorRT 10 the network is created with `STRONGLY_TYPED`). Shapes are static (the
contract's), so the one optimization profile has min = opt = max. Our ONNX files are opset 20 and hold
no `Attention` op, so TensorRT-RTX's `IAttention` (and its `decomposable` switch) is never involved.

A plan is named by flavor, version and compute capability (`plan_name`), since it only runs with the
TensorRT that built it, on that GPU architecture.
"""

from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from livetalk_cli.errors import UserError
from livetalk_cli.export.contract import DTYPES, Contract
from livetalk_cli.files import atomic_path

log = logging.getLogger(__name__)

FLAVORS = ("trt", "trt-rtx")
_MODULES = {"trt": "tensorrt", "trt-rtx": "tensorrt_rtx"}
_EXTRAS = {"trt": "tensorrt", "trt-rtx": "tensorrt-rtx"}
_NAMES = {"trt": "TensorRT", "trt-rtx": "TensorRT-RTX"}
_PLAN_PREFIX = {"trt": "trt", "trt-rtx": "trtrtx"}
WORKSPACE_BYTES = 4 << 30  # scratch memory the builder may give a layer's tactics
_TRT_DTYPES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "bool": "BOOL", "int64": "INT64"}
_MALFORMED = 32  # EngineInvalidityDiagnostics.MALFORMED_ENGINE (TensorRT-RTX)


def _check_flavor(flavor: str) -> None:
    if flavor not in FLAVORS:
        raise ValueError(f"unknown TensorRT flavor {flavor!r}; choose from {', '.join(FLAVORS)}")


def import_tensorrt(flavor: str) -> ModuleType:
    """The flavor's Python module (`tensorrt` or `tensorrt_rtx`); one-line UserError naming the extra when
    it is not installed or cannot load its libraries."""
    _check_flavor(flavor)
    hint = f"pip install 'livetalk[{_EXTRAS[flavor]}]'"
    try:
        return importlib.import_module(_MODULES[flavor])
    except ModuleNotFoundError:
        raise UserError(f"{_NAMES[flavor]} is not installed: {hint}") from None
    except (ImportError, OSError) as e:  # a stub wheel or missing shared libraries
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(f"{_NAMES[flavor]} cannot be loaded ({first}): {hint}") from None


def trt_version(flavor: str) -> str:
    """The installed flavor's version, e.g. "10.13.3.9" or "1.7.1.116"."""
    return str(import_tensorrt(flavor).__version__)


def plan_name(flavor: str, version: str, sm: str) -> str:
    """`engine_trt<version>_sm<cc>.plan` (full TensorRT) or `engine_trtrtx<version>_sm<cc>.plan`."""
    _check_flavor(flavor)
    return f"engine_{_PLAN_PREFIX[flavor]}{version}_sm{_normalize_sm(sm)}.plan"


def _normalize_sm(sm: str) -> str:
    """"89", "8.9", "sm89" and "sm_89" → "89"."""
    s = str(sm).strip().lower().removeprefix("sm").lstrip("_").replace(".", "")
    if not s.isdigit():
        raise UserError(f"bad compute capability {sm!r}: use digits like 89 (8.9) or 120 (12.0)")
    return s


def _local_sm() -> str | None:
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}"


def _first_line(text: str, limit: int = 200) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[0][:limit] if lines else "unknown error"


# --- logging ---------------------------------------------------------------------------------------
def _make_logger(trt: ModuleType) -> Any:
    """A TensorRT logger that forwards to `logging` and keeps the errors (for one-line UserErrors).
    `quiet = True` demotes everything to DEBUG (probes expected to complain, e.g. with no GPU)."""
    sev = trt.ILogger.Severity
    levels = {sev.INTERNAL_ERROR: logging.ERROR, sev.ERROR: logging.ERROR, sev.WARNING: logging.WARNING,
              sev.INFO: logging.DEBUG}

    class _Logger(trt.ILogger):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.quiet = False

        def log(self, severity: Any, msg: str) -> None:
            level = levels.get(severity)
            if level is None:  # VERBOSE
                return
            if level >= logging.ERROR:
                self.errors.append(msg)
            log.log(logging.DEBUG if self.quiet else level, "%s", msg)

        def last_error(self) -> str:
            return _first_line(self.errors[-1]) if self.errors else "no error reported"

    return _Logger()


# --- building --------------------------------------------------------------------------------------
def _target_sm(trt: ModuleType, flavor: str, sm: str | None) -> tuple[str, Any]:
    """(cc digits, the RTX `ComputeCapability` or None) the plan is built for."""
    local = _local_sm()
    if flavor == "trt":
        if local is None:
            raise UserError("TensorRT builds need a CUDA GPU (the plan is tuned on it); "
                            "TensorRT-RTX builds without one: --format trt-rtx")
        if sm is not None and _normalize_sm(sm) != local:
            raise UserError(f"TensorRT builds for this GPU (sm{local}) only, not sm{_normalize_sm(sm)}; "
                            "drop --trt-sm or build on such a GPU")
        return local, None
    if sm is None and local is None:
        raise UserError("TensorRT-RTX needs the compute capability to build for without a GPU: --trt-sm 89")
    cc = _normalize_sm(sm if sm is not None else local)  # type: ignore[arg-type]
    target = getattr(trt.ComputeCapability, f"SM{cc}", None)
    if target is None:
        known = [n.removeprefix("SM") for n in trt.ComputeCapability.__members__ if n.startswith("SM")]
        raise UserError(f"TensorRT-RTX {trt.__version__} cannot build for sm{cc}; it supports sm "
                        f"{', '.join(known)}")
    return cc, target


def _parse(trt: ModuleType, builder: Any, logger: Any, onnx_path: Path) -> tuple[Any, Any]:
    """(strongly typed network, parser) of an ONNX file; the parser owns weights the network uses,
    so it must outlive the build."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # TensorRT 11: always
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        why = parser.get_error(0).desc() if parser.num_errors else logger.last_error()
        raise UserError(f"TensorRT cannot parse {onnx_path}: {_first_line(why)}")
    return network, parser


def _add_profile(builder: Any, network: Any, config: Any, contract: Contract) -> None:
    """min = opt = max = the contract's shapes, for inputs the ONNX file left dynamic."""
    specs = {s.name: s for s in contract.inputs}
    profile, dynamic = builder.create_optimization_profile(), False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        spec = specs.get(tensor.name)
        if spec is None:
            raise UserError(f"{contract.component}: the ONNX file has an input {tensor.name!r} the contract "
                            f"lacks ({', '.join(specs)})")
        if any(d < 0 for d in tensor.shape):
            dynamic = True
            profile.set_shape(tensor.name, spec.shape, spec.shape, spec.shape)
    if dynamic:
        config.add_optimization_profile(profile)


def _load_timing_cache(config: Any, path: Path | None) -> None:
    """A timing cache from `path` (fresh if absent, unreadable or made elsewhere)."""
    blob = b""
    if path is not None and path.is_file():
        try:
            blob = path.read_bytes()
        except OSError as e:
            log.warning("ignoring timing cache %s: %s", path, e.strerror or e)
    try:
        cache = config.create_timing_cache(blob)
    except Exception:  # a corrupt file: some bindings raise rather than return an empty cache
        cache = None
    if cache is None or not config.set_timing_cache(cache, False):
        log.info("timing cache %s does not fit this TensorRT/GPU; starting a fresh one", path)
        config.set_timing_cache(config.create_timing_cache(b""), False)


def _save_timing_cache(config: Any, path: Path) -> None:
    cache = config.get_timing_cache()
    if cache is None:
        return
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(memoryview(cache.serialize()))
    except OSError as e:
        log.warning("cannot save timing cache %s: %s", path, e.strerror or e)


def build_plan(onnx_path: Path, contract: Contract, out_dir: Path, *, flavor: str, sm: str | None,
               timing_cache: Path | None, workspace_bytes: int = WORKSPACE_BYTES) -> Path:
    """Build `contract`'s component from its ONNX file into `out_dir/plan_name(...)` (written atomically).

    sm: compute capability digits ("89"); None means this GPU's. Full TensorRT builds for the local GPU
    only; TensorRT-RTX builds for any supported sm without a GPU. timing_cache: a file read before and
    written after the build (full TensorRT only; ignored for TensorRT-RTX, which has none).
    """
    trt = import_tensorrt(flavor)
    cc, target = _target_sm(trt, flavor, sm)
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if not onnx_path.is_file():
        raise UserError(f"no ONNX file at {onnx_path}: export --format onnx first")
    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    network, parser = _parse(trt, builder, logger, onnx_path)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    _add_profile(builder, network, config, contract)
    if target is not None:
        config.num_compute_capabilities = 1
        if not config.set_compute_capability(target, 0):
            raise UserError(f"TensorRT-RTX refused compute capability sm{cc}: {logger.last_error()}")
    use_cache = flavor == "trt" and timing_cache is not None
    if use_cache:
        _load_timing_cache(config, timing_cache)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"{_NAMES[flavor]} could not build {contract.component} for sm{cc}: {logger.last_error()}")
    del parser  # the network's weights are no longer needed
    if use_cache:
        assert timing_cache is not None
        _save_timing_cache(config, timing_cache)
    path = out_dir / plan_name(flavor, trt.__version__, cc)
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(memoryview(serialized))
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    log.info("%s: %s plan for sm%s in %.1fs, %.1f MB", contract.component, _NAMES[flavor], cc,
             time.perf_counter() - t0, path.stat().st_size / 1e6)
    return path


# --- running ---------------------------------------------------------------------------------------
class TrtEngine:
    """A TensorRT plan on a CUDA device: positional tensors in contract order in, fresh tensors (clones of
    preallocated outputs, so the caller may keep them) in contract order out, on the current stream.

    flavor "trt-rtx" runs a TensorRT-RTX plan (on an RTX GPU) through the same API; its kernels are
    compiled when the plan is loaded.
    """

    def __init__(self, plan_path: Path, contract: Contract, device: torch.device, *, flavor: str = "trt"):
        trt = import_tensorrt(flavor)
        self.contract, self.device, self.path = contract, torch.device(device), Path(plan_path)
        try:
            blob = self.path.read_bytes()
        except OSError as e:
            raise UserError(f"cannot load TensorRT plan {self.path}: {e.strerror or e}") from None
        self._logger = _make_logger(trt)
        runtime = trt.Runtime(self._logger)
        self._check_header(runtime, blob)
        if self.device.type != "cuda":
            raise UserError(f"TensorRT engines need a CUDA device (--device cuda), not {self.device.type}")
        with torch.cuda.device(self.device):
            engine = runtime.deserialize_cuda_engine(blob)
            if engine is None:
                raise UserError(f"cannot load TensorRT plan {self.path}: {self._logger.last_error()}")
            self._check_io(trt, engine)
            context = engine.create_execution_context()
            if context is None:
                raise UserError(f"cannot run TensorRT plan {self.path}: {self._logger.last_error()}")
            for spec in contract.inputs:
                context.set_input_shape(spec.name, spec.shape)
            self._outputs = [torch.empty(s.shape, dtype=DTYPES[s.dtype], device=self.device)
                             for s in contract.outputs]
            for spec, t in zip(contract.outputs, self._outputs, strict=True):
                context.set_tensor_address(spec.name, t.data_ptr())
        self._runtime, self._engine, self._context = runtime, engine, context

    def _check_header(self, runtime: Any, blob: bytes) -> None:
        """A file that is not a plan at all: said before any CUDA work (TensorRT-RTX can tell without a GPU)."""
        if not hasattr(runtime, "get_engine_validity"):
            return
        header = blob[: max(int(getattr(runtime, "engine_header_size", 0) or 0), 64)]
        self._logger.quiet = True
        try:
            _, diagnostics = runtime.get_engine_validity(header)
        except Exception:  # an older binding: the deserialization below will say
            return
        finally:
            self._logger.quiet = False
            self._logger.errors.clear()  # without a GPU the probe complains about CUDA
        if int(diagnostics) & _MALFORMED:
            raise UserError(f"cannot load TensorRT plan {self.path}: not a plan of this TensorRT "
                            f"({len(blob)} bytes, malformed header)")

    def _check_io(self, trt: ModuleType, engine: Any) -> None:
        """The plan's inputs and outputs are the contract's (names, order, dtypes, shapes)."""
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        c = self.contract
        if inputs != c.input_names or outputs != c.output_names:
            raise UserError(f"{self.path}: inputs/outputs {inputs}/{outputs} do not match the contract "
                            f"{c.input_names}/{c.output_names}: export it again")
        for spec in (*c.inputs, *c.outputs):
            want = getattr(trt.DataType, _TRT_DTYPES[spec.dtype])
            shape = tuple(engine.get_tensor_shape(spec.name))
            same_shape = len(shape) == len(spec.shape) and all(
                d in (-1, s) for d, s in zip(shape, spec.shape, strict=True))
            if engine.get_tensor_dtype(spec.name) != want or not same_shape:
                raise UserError(f"{self.path}: {spec.name} is {engine.get_tensor_dtype(spec.name)}{list(shape)}, "
                                f"the contract says {spec.dtype}{list(spec.shape)}: export it again")

    def __call__(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        from livetalk_cli.export.backends import check_inputs

        check_inputs(self.contract, inputs)
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            feeds = [t.to(self.device).contiguous() for t in inputs]  # kept alive until enqueued
            for spec, t in zip(self.contract.inputs, feeds, strict=True):
                self._context.set_tensor_address(spec.name, t.data_ptr())
            if not self._context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"{self.contract.component}: TensorRT execution failed: "
                                   f"{self._logger.last_error()}")
            return tuple(t.clone() for t in self._outputs)
