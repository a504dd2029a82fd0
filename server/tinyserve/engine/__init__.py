"""The engine: a token-level scheduler over a paged KV cache, sampling and the step loop.

No asyncio and no grpc in this package: the server drives `LLMEngine.step()` from its own thread.
"""

from .engine import EngineError, LLMEngine, QueueFullError, RequestOutput, TokenLogprob
from .params import EngineConfig, FinishReason, ParamError, SamplingParams, StoppingParams

__all__ = [
    "EngineConfig",
    "EngineError",
    "FinishReason",
    "LLMEngine",
    "ParamError",
    "QueueFullError",
    "RequestOutput",
    "SamplingParams",
    "StoppingParams",
    "TokenLogprob",
]
