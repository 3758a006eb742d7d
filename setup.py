"""Installs the `livetalk` toolkit. The CUDA extension in csrc/ is built only where CUDA is available.

`livetalk_cli._csrc` (the fused sink + ring attention kernel of `livetalk::sink_ring_attention`) is
built when torch is importable at build time, is a CUDA build (`torch.version.cuda`) and finds a CUDA
toolkit (`CUDA_HOME`): `pip install --no-build-isolation -e .` on a CUDA machine with torch installed.
Anywhere else (a CPU torch, or pip's isolated build env without torch) the install is pure Python and
the op runs its reference implementation. LIVETALK_CUDA_ARCHS overrides the architectures ("80;90").
"""

import os

from setuptools import find_packages, setup


def _extensions() -> tuple[list, dict]:
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return [], {}
    archs = os.environ.get("LIVETALK_CUDA_ARCHS", "80;90").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
    ext = CUDAExtension(
        "livetalk_cli._csrc",
        ["csrc/sink_ring_attention.cu", "csrc/torch/sink_ring_op.cpp"],
        include_dirs=[os.path.abspath("csrc/include")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *gencode]},  # BuildExtension sets -std
    )
    return [ext], {"build_ext": BuildExtension}


EXT_MODULES, CMDCLASS = _extensions()

setup(
    name="livetalk",
    version="0.1.0",
    description="Real-time audio-driven avatar video diffusion: distil, export, render, stream, bench.",
    python_requires=">=3.11",
    packages=find_packages(include=["livetalk_cli", "livetalk_cli.*"]),
    package_data={"livetalk_cli": ["assets/**/*", "serve/static/*"]},
    install_requires=[
        "torch>=2.11",
        "numpy>=1.26",
        "av>=12",
        "pillow>=10",
        "safetensors>=0.4",
        "typer>=0.20,<0.29",  # 0.29 tags every option with <bool>/<str> in --help (tests/test_cli.py)
        "rich>=13,<16",
        "pyyaml>=6",
    ],
    extras_require={
        # the suite exports and runs ONNX engines (tests/test_export.py) and drives serve-local from Python
        # and from a headless Chromium (Debian's /usr/bin/chromium, driven by Playwright)
        "test": ["pytest>=8", "ruff>=0.6", "transformers>=4.45", "tokenizers>=0.19", "ftfy>=6",
                 "onnx>=1.18", "onnxruntime>=1.20", "onnxscript>=0.5", "tensorrt-rtx>=1.7",
                 "fastapi>=0.110", "uvicorn[standard]>=0.29", "websockets>=13", "aiortc>=1.9", "playwright>=1.40"],
        # umT5 / wav2vec2 from local folders; ftfy: Wan's prompt cleaning before umT5 tokenises
        "transformers": ["transformers>=4.45", "tokenizers>=0.19", "ftfy>=6"],
        # torch.onnx.export(dynamo=True) needs onnxscript; tested with onnx 1.23, onnxruntime 1.32, onnxscript 0.7
        "onnx": ["onnx>=1.18", "onnxruntime>=1.20", "onnxscript>=0.5"],
        "tensorrt": ["tensorrt>=10.0"],  # full TensorRT 10/11 (GPU machines)
        # builds plans without a GPU (SM 75-121, not 90); the suite builds the tiny and demo components with it
        "tensorrt-rtx": ["tensorrt-rtx>=1.7"],
        # serve-local: FastAPI on uvicorn (HTTP + WebSocket), websockets (the Python client), aiortc (WebRTC
        # to the browser; pulls PyAV). Tested with fastapi 0.165, uvicorn 0.55, websockets 17.4, aiortc 1.16.
        "serve": ["fastapi>=0.110", "uvicorn[standard]>=0.29", "websockets>=13", "aiortc>=1.9"],
    },
    entry_points={"console_scripts": ["livetalk=livetalk_cli.cli:main"]},
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
)
