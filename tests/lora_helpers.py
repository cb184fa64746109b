"""Helpers for LoRA tests: snapshots, the expected weights, and archives like Replicate's."""

from __future__ import annotations

import io
import tarfile

import torch

from wanlora.lora.fetch import Credentials, FetchedLora, fetch_lora_files
from wanlora.lora.merge import LoraMerger


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def assert_weights(module: torch.nn.Module, base: dict, deltas: list[tuple[dict, float]], atol: float = 1e-6):
    """Every parameter equals base + sum(strength * delta); untouched ones bitwise."""
    for name, param in module.named_parameters():
        touched = [(d[name], s) for d, s in deltas if name in d]
        if not touched:
            assert torch.equal(param, base[name]), f"{name} changed but no LoRA targets it"
            continue
        want = base[name].double() + sum(s * d.double().reshape(param.shape) for d, s in touched)
        err = (param.double() - want).abs().max().item()
        assert err <= atol, f"{name} is off by {err}"


def assert_bitwise(module: torch.nn.Module, reference: dict[str, torch.Tensor]):
    for name, param in module.named_parameters():
        assert torch.equal(param, reference[name]), f"{name} differs"


def tar_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buffer.getvalue()


def fetch_lora(ref: str, credentials: Credentials | None = None, cache=None) -> FetchedLora:
    """The one LoRA file `ref` names (a Wan2.2 pair is two: the tests ask for those with fetch_lora_files)."""
    files = fetch_lora_files(ref, credentials, cache)
    assert len(files) == 1, files
    return files[0][1]


def merge(merger: LoraMerger, loras) -> int:
    """Make `merger`'s weights base + the weighted sum of `loras`; return the tensors rewritten."""
    return merger.write(merger.prepare(loras))
