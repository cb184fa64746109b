"""wanlora: Wan2.1 and Wan2.2 video generation with LoRAs from anywhere.

    >>> from wanlora import WanLoraPipeline
    >>> pipe = WanLoraPipeline.from_pretrained("t2v-14b")  # or t2v-1.3b, i2v-14b-480p, t2v-a14b, ti2v-5b, ...
    >>> pipe.generate("a corgi surfing", loras=[("owner/style-lora", 0.8)], seed=1).save("corgi.mp4")

LoRAs come from a Hugging Face repo, a Civitai or Replicate link, any https:// link to a
.safetensors file, or a local path, in any published Wan layout; they are merged into the
weights exactly and swapped without reloading the model. The heavy parts (torch,
diffusers) load on first use, so `wanlora --help` and input validation stay fast.
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
            "CheckpointChanged",
            "InternalError",
            "InvalidInput",
            "LoraAuthRequired",
            "LoraDownloadError",
            "LoraError",
            "LoraFormatError",
            "LoraMismatch",
            "LoraNotFound",
            "ModelNotFound",
            "OutOfMemory",
            "VideoEncodeError",
            "WanLoraError",
            "WeightsPartlyMerged",
            "WorkerCrashed",
        )
    },
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'wanlora' has no attribute {name!r}")
