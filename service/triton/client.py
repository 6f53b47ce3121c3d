"""tritonclient's gRPC clients, imported in one place (sync for tests/tools, asyncio for the gateway).

tritonclient[grpc] 2.73's generated stubs need grpcio >= 1.81.1 (pinned in pyproject.toml).
"""

from __future__ import annotations

import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

__all__ = ["aioclient", "grpcclient", "InferenceServerException", "np_to_triton_dtype"]
