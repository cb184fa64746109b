"""wanlora: Wan2.1 video generation with LoRAs from anywhere.

The heavy parts (torch, diffusers) load on first use, so `wanlora --help` and input
validation stay fast.
"""

from importlib import import_module

__version__ = "0.2.0"

_EXPORTS = {
    "WanLoraPipeline": "pipeline",
    "Video": "video",
    "ParallelPlan": "parallel",
    **{
        name: "errors"
        for name in (
            "InvalidInput",
            "LoraAuthRequired",
            "LoraDownloadError",
            "LoraError",
            "LoraFormatError",
            "LoraMismatch",
            "LoraNotFound",
            "ModelNotFound",
            "VideoEncodeError",
            "WanLoraError",
            "WorkerCrashed",
        )
    },
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'wanlora' has no attribute {name!r}")
