"""Installs the ``mfnet`` training library (PyTorch) and ``mfnet_ext``, its custom operators.

The torch-free runtime (``runtime/``, distribution ``mfnet-runtime``) is a dependency: it owns
the artifact format and the frame pipeline that ``mfnet.predict`` and the export use. It lives in
this repository, not on a package index, so the requirement is a PEP 508 direct reference to
the ``runtime/`` folder beside this file (an absolute ``file://`` URI, computed here: pip
accepts no relative paths in requirements). Its ``video`` extra (OpenCV) comes with it, so
``python -m mfnet.predict`` reads and writes videos after ``pip install -e .``.

``mfnet_ext`` (sources in ``cuda_ext/``) is installed as pure Python plus its C++/CUDA sources;
it compiles them just in time on first use (``python -m mfnet_ext build`` does it at once), so a
machine without CUDA installs and runs everything, with the PyTorch references. To compile the
extension ahead of time instead, as ``mfnet_ext._C``:

    MFNET_BUILD_CUDA_EXT=1 CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e .

``--no-build-isolation`` makes the build use the torch already installed: with pip's default
build isolation it would download a second torch (several GB) into a temporary environment and
compile against that one. Without the switch, this file does not import torch.
"""

import os
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
EXT_DIR = "cuda_ext/mfnet_ext"
RUNTIME_REQUIREMENT = f"mfnet-runtime[video] @ {(HERE / 'runtime').as_uri()}"


def cuda_extension_kwargs() -> dict:
    """``ext_modules`` and ``cmdclass`` of the ahead-of-time build (MFNET_BUILD_CUDA_EXT=1)."""
    if os.environ.get("MFNET_BUILD_CUDA_EXT", "0") != "1":
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as error:
        raise SystemExit(
            f"MFNET_BUILD_CUDA_EXT=1 needs torch to build the extension, but it cannot be "
            f"imported ({error}). Install torch first, then build without pip's build isolation "
            "(which would otherwise fetch a second torch):\n"
            "    MFNET_BUILD_CUDA_EXT=1 CUDA_HOME=/usr/local/cuda "
            "pip install --no-build-isolation -e ."
        ) from error
    import torch

    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):  # the visible GPUs, else the H100 / H200
        capabilities = sorted(
            {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        )
        os.environ["TORCH_CUDA_ARCH_LIST"] = (
            ";".join(f"{major}.{minor}" for major, minor in capabilities) or "9.0"
        )
    sources = sorted(
        str(path.relative_to(HERE))
        for pattern in ("*.cpp", "*.cu")
        for path in (HERE / EXT_DIR / "csrc").glob(pattern)
    )
    extension = CUDAExtension(
        name="mfnet_ext._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(
    name="mfnet",
    version="0.1.0",
    description=(
        "MFNet: multi-class few-shot semantic segmentation with pixel-wise metric learning "
        "(training, evaluation, export)"
    ),
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[*find_packages(include=["mfnet", "mfnet.*"]), "mfnet_ext"],
    package_dir={"mfnet_ext": EXT_DIR},
    # the sources travel with the package so that the just-in-time build also works from a
    # regular (non-editable) install
    package_data={"mfnet_ext": ["csrc/*.cpp", "csrc/*.cu", "csrc/*.h", "csrc/*.cuh"]},
    install_requires=[
        RUNTIME_REQUIREMENT,
        "torch>=2.11",
        "torchvision>=0.26",
        "numpy",
        "pillow",
        "tqdm",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        # ONNX export and its verification with ONNX Runtime
        "export": ["onnx", "onnxscript", "onnxruntime"],
        # PASCAL-5i preparation from SBD .mat files; COCO-20i masks
        "data": ["scipy", "pycocotools"],
        # the just-in-time build of the CUDA extension (torch's cpp_extension runs ninja)
        "cuda": ["ninja"],
        # lint, format and type check (pinned: another version formats or flags differently)
        "lint": ["ruff==0.17.6", "mypy==2.4.1"],
        "test": [
            "pytest",
            "hypothesis",
            "onnx",
            "onnxscript",
            "onnxruntime",
            "scipy",
            "pycocotools",
            "ninja",
            "ruff==0.17.6",
            "mypy==2.4.1",
            # Triton's model-config protobuf schema (tests of the Triton model repository);
            # it pins protobuf < 7 and ml-dtypes <= 0.5.4, both within onnx's requirements
            "tritonclient[grpc]",
        ],
    },
    license="MIT",
    **cuda_extension_kwargs(),
)
