"""Installs the `livetalk` toolkit. The CUDA extension in csrc/ is built only where CUDA is available."""

from setuptools import find_packages, setup

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
        "test": ["pytest>=8", "ruff>=0.6", "transformers>=4.45", "tokenizers>=0.19",
                 "onnx>=1.18", "onnxruntime>=1.20", "onnxscript>=0.5", "tensorrt-rtx>=1.7",
                 "fastapi>=0.110", "uvicorn[standard]>=0.29", "websockets>=13", "aiortc>=1.9", "playwright>=1.40"],
        "transformers": ["transformers>=4.45", "tokenizers>=0.19"],
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
)
