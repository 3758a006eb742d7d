"""Run a CPU AOTInductor package through its C ABI, so the GIL is released during a call.

torch's Python runners for `.pt2` packages (`aoti_load_package`: `AOTIModelPackageLoader.run` and
`boxed_run`; `AOTIModelContainerRunnerCpu.run`) hold the GIL for a whole call. In a pipelined
stream the decoder's thread then waits for every DiT pass: a VAE step beside a looping
AOTInductor DiT took 2.8-3.3 s instead of ~50 ms. The compiled model's own C entry points
(`AOTInductorModelContainerCreateWithDevice` / `…Run` / `…GetNumOutputs` / `…Delete`, the ABI
torch's C++ runners call) run through `ctypes`, which releases the GIL: beside the same loop the
VAE step took 44.5 ms.

Tensors cross as `AtenTensorHandle`s made by torch's own helpers
(`torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors`, `alloc_tensors_by_stealing_from_void_ptrs`);
the model takes ownership of the input handles and hands over new output handles (1,500 calls with
fresh inputs: resident memory flat). A CPU package built with its constants inside the model's
shared library is what this supports; anything else is None (the caller keeps torch's runner), a
package that calls custom operators too (`livetalk::sink_ring_attention` with `--attention csrc`):
those go through torch's proxy executor, which only torch's runner provides (its `<wrapper>.json`
lists the calls).
"""

from __future__ import annotations

import ctypes
import logging
import shutil
import tempfile
import weakref
import zipfile
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_get = ctypes.pythonapi.PyCapsule_GetPointer
_get.argtypes = [ctypes.py_object, ctypes.c_char_p]
_get.restype = ctypes.c_void_p
_new = ctypes.pythonapi.PyCapsule_New
_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_new.restype = ctypes.py_object


class CabiRunner:
    """`runner(inputs) -> outputs` for the model library `so` (extracted from a `.pt2`)."""

    def __init__(self, so: Path):
        self.lib = lib = ctypes.CDLL(str(so))
        lib.AOTInductorModelContainerCreateWithDevice.argtypes = [
            ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_char_p, ctypes.c_char_p]
        lib.AOTInductorModelContainerGetNumOutputs.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
        lib.AOTInductorModelContainerRun.argtypes = [
            ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p]
        lib.AOTInductorModelContainerDelete.argtypes = [ctypes.c_void_p]
        for fn in ("CreateWithDevice", "GetNumOutputs", "Run", "Delete"):
            getattr(lib, f"AOTInductorModelContainer{fn}").restype = ctypes.c_int32
        self.handle = ctypes.c_void_p()
        self._check(lib.AOTInductorModelContainerCreateWithDevice(ctypes.byref(self.handle), 1, b"cpu", None),
                    "create")
        n = ctypes.c_size_t()
        self._check(lib.AOTInductorModelContainerGetNumOutputs(self.handle, ctypes.byref(n)), "count outputs")
        self.num_outputs = n.value
        weakref.finalize(self, lib.AOTInductorModelContainerDelete, self.handle)

    @staticmethod
    def _check(code: int, what: str) -> None:
        if code != 0:
            raise RuntimeError(f"AOTInductor model: {what} failed (error {code})")

    def __call__(self, inputs: list[Tensor]) -> list[Tensor]:
        caps = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors(inputs)  # new handles, stolen by Run
        ins = (ctypes.c_void_p * len(caps))(*[_get(c, None) for c in caps])
        outs = (ctypes.c_void_p * self.num_outputs)()
        self._check(self.lib.AOTInductorModelContainerRun(self.handle, ins, len(caps), outs, self.num_outputs,
                                                          None, None), "run")
        return torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs([_new(p, None, None) for p in outs])


def cabi_runner(package: Path) -> CabiRunner | None:
    """A GIL-free runner for a CPU `.pt2` whose only binary is the model library, else None."""
    try:
        with zipfile.ZipFile(package) as z:
            libs = [n for n in z.namelist() if n.endswith(".so")]
            others = [n for n in z.namelist() if n.endswith((".blob", ".o", ".bin"))
                      or (n.endswith(".json") and not n.endswith("_metadata.json"))]  # extern (custom op) calls
            if len(libs) != 1 or others:
                return None
            folder = Path(tempfile.mkdtemp(prefix="livetalk-aoti-"))
            so = Path(z.extract(libs[0], folder))
    except (OSError, zipfile.BadZipFile):
        return None
    try:
        runner = CabiRunner(so)
    except (OSError, AttributeError, RuntimeError) as e:
        log.info("AOTInductor C ABI unavailable for %s (%s): using torch's runner", package, e)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    weakref.finalize(runner, shutil.rmtree, folder, True)
    return runner
