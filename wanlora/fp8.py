"""fp8 weights: the transformer's block linears stored as float8_e4m3fn with an fp32 scale per output channel.

A row of W is stored as q = round(W / s) with s = amax(|row|) / 448, so q * s ~ W within fp8's
3-bit mantissa, and each channel uses fp8's whole range. Norms, modulation, embeddings and
the head stay as they are: they are small, and the first to hurt when rounded.

Compute, per `Fp8Linear.matmul`:
- "scaled": the activations are quantized per token with a power-of-two scale (exact to
  apply and to undo in bf16), and `torch._scaled_mm` multiplies fp8 by fp8 with rowwise
  scales, on GPUs with fp8 tensor cores (compute capability 8.9 and up). Per token, not
  per tensor: one outlier token (Wan's text-attention outputs have some) would otherwise
  push every other token of the tensor into fp8's coarse low range.
- "weight-only": the weight is dequantized to the activations' dtype for each call, and
  the matmul runs there: Ampere GPUs and the CPU. The saving is memory, not time.

LoRA merges write into these layers exactly (wanlora.lora.merge): the sum W0 + sum(s_i dW_i)
in fp32, the scales recomputed from its rows, rounded once.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .errors import InvalidInput

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
MATMULS = ("auto", "scaled", "weight-only")
BLOCK_PREFIX = "blocks."  # the block linears: attention, cross-attention, I2V's image projections, the FFN


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows -> (float8_e4m3fn rows, fp32 scale per row): amax(row) / 448, rounded to nearest even once.

    A row of zeros gets scale 1. The same rows always give the same bits, on any device.
    """
    work = rows.float().clone()
    quantized = torch.empty(work.shape, dtype=FP8, device=work.device)
    return quantized, quantize_rows_into(work, quantized)


def quantize_rows_into(rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`quantize_rows` without allocating rows: `rows` (fp32) is used up, `out` (fp8) written; returns the scales."""
    amax = rows.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    rows.div_(scale[:, None]).clamp_(-FP8_MAX, FP8_MAX)  # clamp: the division may land a hair above 448
    out.copy_(rows)
    return scale


def dequantize(quantized: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q * s per row, computed in fp32 and given in `dtype`."""
    out = torch.empty(quantized.shape, dtype=torch.float32, device=quantized.device)
    return dequantize_into(out, quantized, scale).to(dtype)


def dequantize_into(out: torch.Tensor, quantized: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`dequantize` into an fp32 buffer (the merge's accumulator), without allocating."""
    out.copy_(quantized, non_blocking=True)
    return out.mul_(scale.to(out.device, torch.float32, non_blocking=True)[:, None])


class Fp8Linear(torch.nn.Module):
    """A linear layer whose weight is float8_e4m3fn rows, each with an fp32 scale (`weight_scale`)."""

    weight_scale: torch.Tensor  # a buffer: it moves with the module, and a LoRA merge rewrites it in place

    def __init__(
        self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, matmul: str = "weight-only"
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", scale.float())
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.matmul = matmul

    @classmethod
    def of(cls, linear: torch.nn.Linear, matmul: str) -> Fp8Linear:
        """`linear` quantized (its bias kept as it is)."""
        with torch.no_grad():
            quantized, scale = quantize_rows(linear.weight.detach())
        return cls(quantized, scale, None if linear.bias is None else linear.bias.detach(), matmul)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.matmul == "scaled":
            return scaled_linear(x, self.weight, self.weight_scale, self.bias)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, dequantize(self.weight, self.weight_scale, x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8, matmul={self.matmul}"


def scaled_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """x @ (weight * scale).T + bias as one fp8 x fp8 matmul, x quantized per token on the fly."""
    rows = x.reshape(-1, x.shape[-1])
    amax = rows.abs().amax(dim=1, keepdim=True).float()
    # a power of two at or above amax / 448: dividing by it is exact in any float dtype
    token_scale = torch.exp2(torch.ceil(torch.log2(torch.clamp(amax / FP8_MAX, min=2.0**-126))))
    quantized = (rows / token_scale.to(rows.dtype)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    out = torch._scaled_mm(
        quantized,
        weight.t(),
        scale_a=token_scale,
        scale_b=scale.view(1, -1),
        bias=None if bias is None else bias.to(x.dtype),
        out_dtype=x.dtype,
    )
    return out.reshape(*x.shape[:-1], weight.shape[0])


def choose_matmul(requested: str, device: torch.device) -> str:
    """ "scaled" where the device has fp8 tensor cores, else "weight-only"; a request is checked."""
    if requested not in MATMULS:
        raise InvalidInput("fp8 matmul", requested, f"one of {', '.join(MATMULS)}")
    if requested != "auto":
        return requested
    has_fp8_cores = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
    return "scaled" if has_fp8_cores else "weight-only"


def quantize_transformer(transformer: torch.nn.Module, matmul: str = "weight-only") -> int:
    """Replace every block linear of `transformer` by its Fp8Linear, one layer at a time; return how many."""
    targets = [
        (name, module)
        for name, module in transformer.named_modules()
        if name.startswith(BLOCK_PREFIX) and type(module) is torch.nn.Linear
    ]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(transformer.get_submodule(parent_name), child, Fp8Linear.of(linear, matmul))
    return len(targets)


def fp8_layers(module: torch.nn.Module) -> dict[str, Fp8Linear]:
    """Every Fp8Linear in `module`, by the name of its weight parameter."""
    return {f"{name}.weight": layer for name, layer in module.named_modules() if isinstance(layer, Fp8Linear)}


def set_matmul(module: torch.nn.Module, matmul: str) -> None:
    for layer in fp8_layers(module).values():
        layer.matmul = matmul
