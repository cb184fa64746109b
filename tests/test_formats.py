"""The weight-format interface: formats registered by name, and no module outside a format's own naming it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from wanlora import InvalidInput
from wanlora.weights import formats
from wanlora.weights.formats.base import BLOCK_PREFIX, Stored

PACKAGE = Path(__file__).resolve().parents[1] / "wanlora"
FORMATS = PACKAGE / "weights" / "formats"


def _registry_without_its_entries() -> str:
    """The registry's source less its ENTRIES table: the one place that lists every format by name."""
    source = (FORMATS / "__init__.py").read_text()
    start = source.index("ENTRIES = (")
    end = source.index("\n)\n", start)
    return source[:start] + source[end:]


def test_no_module_outside_the_fp8_formats_own_names_fp8():
    """The merge, pristine copies, checkpoints, single files, the memory plan, the pipeline and the front ends
    ask the format: a new format touches none of them."""
    token = re.compile("fp8", re.IGNORECASE)
    naming = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("weights/formats/fp8"):
            continue
        text = _registry_without_its_entries() if relative == "weights/formats/__init__.py" else path.read_text()
        naming += [
            f"{relative}:{n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1) if token.search(line)
        ]
    assert not naming, "\n".join(naming)


def test_every_registered_format_loads_by_name_and_quantize_choices_come_from_the_registry():
    assert [fmt.name for fmt in formats.every()] == [entry.name for entry in formats.ENTRIES]
    assert formats.QUANTIZE_CHOICES == ("none", *(e.name for e in formats.ENTRIES if e.quantize))
    assert formats.check_quantize("none") is None and formats.check_quantize(None) is None
    for name in formats.QUANTIZE_CHOICES[1:]:
        assert formats.check_quantize(name) == name
    with pytest.raises(InvalidInput, match=r"quantize='int3' is not allowed: one of none, "):
        formats.check_quantize("int3")


def test_the_registry_is_light_enough_for_the_clis_help():
    """--help answers before torch loads: the registry names its formats without importing them."""
    import subprocess
    import sys

    code = "import sys, wanlora.weights.formats as f; print(f.QUANTIZE_CHOICES, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")


@pytest.mark.parametrize("name", [entry.name for entry in formats.ENTRIES if entry.quantize])
def test_each_quantized_format_round_trips_through_its_own_interface(name):
    """convert -> stored -> decode gives values within the format's rounding; encode of the decoded values
    gives the stored tensors back bitwise (a format's rounding is a projection); the memory plan's bytes
    are the layer's own."""
    fmt = formats.get(name)
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    layer = fmt.convert(linear, fmt.planned_matmul)
    assert formats.format_of(layer) is fmt and formats.format_of(linear) is formats.full_precision()
    stored = fmt.stored(layer)
    assert isinstance(stored, Stored) and stored.format is fmt
    w0 = torch.empty(32, 64)
    fmt.decode_into(w0, stored.rows(0, 32))
    assert (w0 - linear.weight.detach()).abs().max() <= 0.07 * linear.weight.detach().abs().max()
    assert fmt.peak(stored.data) >= float(w0.abs().max()) * (1 - 1e-6)  # a bound, to fp32's rounding of W0
    again = fmt.encode(w0, stored.rows(0, 32))
    for a, b in zip(again, stored.rows(0, 32), strict=True):
        assert torch.equal(a.view(torch.uint8), b.contiguous().view(torch.uint8))
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(64, 32))])
    assert fmt.convert_transformer(model) == 1 and f"{BLOCK_PREFIX}0.0.weight" in fmt.layers(model)
    assert fmt.describe(model)
