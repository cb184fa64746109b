"""Weight formats: how a transformer's block linears are stored, rounded, read back, sized and multiplied.

Each format is one module here behind one interface (`base.WeightFormat`), registered by name in
`ENTRIES`. The rest of the package asks the format and never names one: the LoRA merge sums
`W0 + sum(s_i dW_i)` in fp32 and hands the sum to the format's final rounding (`encode_into`),
pristine copies and checkpoints read W0 back through `decode_into`, the memory plan counts the
format's layers as built on `meta`, the pipeline converts block linears with `convert` and chooses
matmuls with `choose_matmul`, and single files are read through the format's file conventions.

This module is light (no torch): the CLI takes its `--quantize` choices and help from `ENTRIES`
before anything heavy loads. A format's module is imported the first time it is asked for.

A new format is a module exporting `FORMAT` (a `WeightFormat`), one entry below, and its tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING, Any

from ...errors import InvalidInput

if TYPE_CHECKING:
    from .base import WeightFormat


@dataclass(frozen=True)
class Entry:
    """A registered format: its name, the module that implements it, and what it says of itself."""

    name: str
    module: str  # in this package; imported on first use
    help: str  # one line, for --quantize's help and the docs
    quantize: bool = True  # offered as `quantize=NAME`: a full-precision model's block linears converted to it
    lora_modes: tuple[str, ...] = ("requantize",)  # how LoRAs apply to its weights (the format's own), default first
    plans: tuple[str, ...] = ()  # a file format's memory-plan rows, by the files' types (e.g. "gguf-Q4_K_M")
    cards_gb: tuple[int, ...] = ()  # smaller cards its plans are made for too, beside every format's


DENSE = "bf16"  # the full-precision format's name in memory plans (bf16 on a GPU; fp16 and fp32 as loaded)
ENTRIES = (
    Entry(DENSE, "dense", "full precision, as loaded (bf16 on a GPU, fp32 on the CPU)", quantize=False),
    Entry(
        "fp8",
        "fp8",
        "the transformer's block linears in float8 with a scale per row (half the memory; fp8 matmuls on GPUs "
        "that have them), LoRAs still merged exactly",
    ),
    Entry(
        "gguf",
        "gguf",
        "a .gguf transformer file's own blocks (city96's, QuantStack's), dequantized per call; LoRAs unfused, "
        "requantized or promoted (lora_mode)",
        quantize=False,
        lora_modes=("unfused", "requantize", "promote"),
        plans=tuple(f"gguf-{t}" for t in ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q3_K_S")),
        cards_gb=(12, 16),
    ),
)
BY_NAME = {entry.name: entry for entry in ENTRIES}
QUANTIZE_CHOICES = ("none", *(entry.name for entry in ENTRIES if entry.quantize))
PLANNED = (DENSE, *QUANTIZE_CHOICES[1:])  # what memory plans build on `meta` by name (files' formats plan their own)


def quantize_help() -> str:
    return "; ".join(f"{e.name}: {e.help}" for e in ENTRIES if e.quantize) + "; default none"


def check_quantize(quantize: object) -> str | None:
    """`quantize` as the library takes it: None for full precision, or a registered format's name."""
    if quantize is None or quantize == "none":
        return None
    if quantize not in QUANTIZE_CHOICES:
        raise InvalidInput("quantize", quantize, f"one of {', '.join(QUANTIZE_CHOICES)}")
    return str(quantize)


def quantizing_to(dtype: Any) -> str | None:
    """The `quantize` format whose weights are stored as `dtype` (a torch dtype), if any: what a person who asked
    for that dtype meant."""
    return next((e.name for e in ENTRIES if e.quantize and get(e.name).stores(dtype)), None)


def for_plan(plan: str) -> WeightFormat:
    """The format of a memory plan's weights: a format's own name, or one of a file format's `plans`."""
    entry = next((e for e in ENTRIES if plan == e.name or plan in e.plans), None)
    if entry is None:
        every_plan = [*PLANNED, *(p for e in ENTRIES for p in e.plans)]
        raise InvalidInput("weights", plan, f"one of {', '.join(every_plan)}")
    return get(entry.name)


def lora_modes() -> tuple[str, ...]:
    """Every way a registered format applies LoRAs, each once."""
    return tuple(dict.fromkeys(mode for entry in ENTRIES for mode in entry.lora_modes))


def check_lora_mode(mode: object) -> str | None:
    """`lora_mode` as the library takes it: None for each format's default, or a mode some format offers."""
    if mode is None:
        return None
    if mode not in lora_modes():
        raise InvalidInput("lora_mode", mode, f"one of {', '.join(lora_modes())}")
    return str(mode)


def get(name: str) -> WeightFormat:
    """The format registered as `name`."""
    entry = BY_NAME.get(name)
    if entry is None:
        raise InvalidInput("weight format", name, f"one of {', '.join(BY_NAME)}")
    return import_module(f".{entry.module}", __name__).FORMAT


def every() -> list[WeightFormat]:
    """Every registered format, the full-precision one first."""
    return [get(entry.name) for entry in ENTRIES]


def full_precision() -> WeightFormat:
    return get(DENSE)


def format_of(layer: Any) -> WeightFormat:
    """The format a module's weight is stored in: the one whose layer type it is, else full precision."""
    for fmt in every():
        if fmt.layer_type is not None and isinstance(layer, fmt.layer_type):
            return fmt
    return full_precision()


def format_of_dtype(dtype: Any) -> WeightFormat | None:
    """The format whose stored weights are tensors of `dtype` (full precision for the float dtypes), or None."""
    return next((fmt for fmt in every() if fmt.stores(dtype)), None)
