"""Serving at scale: exported engines behind NVIDIA Triton Inference Server (through PyTriton),
and a client with the runtime's ``Segmenter`` API.

``python -m mfnet_runtime serve --engines DIR`` starts the server (``server.serve``);
``RemoteSegmenter(url)`` talks to it (``client``); ``protocol`` owns the model and tensor names,
dtypes, shapes and the request checks of both sides. PyTriton and tritonclient are imported
only when used (``pip install 'mfnet-runtime[serve]'``); nothing here imports torch.
"""

from __future__ import annotations

from .client import RemoteSegmenter
from .protocol import ServingInfo
from .server import ServeOptions, serve

__all__ = ["RemoteSegmenter", "ServeOptions", "ServingInfo", "serve"]
