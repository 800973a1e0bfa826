"""Installs the ``mfnet`` training library (PyTorch). The torch-free runtime is separate."""

from pathlib import Path

from setuptools import find_packages, setup

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
    packages=find_packages(include=["mfnet", "mfnet.*"]),
    install_requires=[
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
        "test": ["pytest", "onnx", "onnxscript", "onnxruntime", "scipy", "pycocotools"],
    },
    license="MIT",
)
