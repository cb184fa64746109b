"""fp8 weights: the transformer's block linears stored as float8 with an fp32 scale per output channel.

A row of W is stored as q = round(W / s) with s = amax(|row|) / max, so q * s ~ W within fp8's
mantissa, and each channel uses fp8's whole range. `quantize="fp8"` makes float8_e4m3fn rows
(max 448, 3 mantissa bits); a single file published in float8_e5m2 (Kijai's `_fp8_e5m2` files:
max 57344, 2 mantissa bits) keeps its own dtype, and its merges round to it. Norms, modulation,
embeddings and the head stay as they are: they are small, and the first to hurt when rounded.

Compute, per `Fp8Linear.matmul`:
- "scaled": the activations are quantized per token with a power-of-two scale (exact to
  apply and to undo), and `torch._scaled_mm` multiplies fp8 by fp8 with row-wise scales. It is
  chosen by running the real kernel once per device (`choose_matmul`), not by the compute
  capability: PyTorch's row-wise kernel runs on sm_89, sm_9x and sm_10x and raises elsewhere
  (sm_120, the RTX 50 series). CUDA's rules for it (`check_scaled_mm`) are asserted on every
  device, so that the CPU, whose kernel accepts more, fails where CUDA would. A layer the rules
  exclude (e5m2 weights, sizes not multiples of 16) computes weight-only.
- "weight-only": the weight is dequantized to the activations' dtype for each call, and
  the matmul runs there: Ampere GPUs and the CPU. The saving is memory, not time.

LoRA merges write into these layers exactly (wanlora.lora.merge): the sum W0 + sum(s_i dW_i)
in fp32, the scales recomputed from its rows, rounded once.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from ...errors import InvalidInput
from ..scratch import thread_buffer
from . import fp8_cpu
from .base import Stored, WeightFormat
from .fp8_files import CONVENTIONS

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn  # what quantize="fp8" makes
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)  # what a layer may hold: its own, or a file's
FP8_MAX = float(torch.finfo(FP8).max)  # 448
MATMULS = ("auto", "scaled", "weight-only")
SCALED_OUT = torch.bfloat16  # the one output dtype CUDA's row-wise kernel gives on every architecture


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def quantize_rows(rows: torch.Tensor, dtype: torch.dtype = FP8) -> tuple[torch.Tensor, torch.Tensor]:
    """rows -> (fp8 rows, fp32 scale per row): amax(row) / max, rounded to nearest even once.

    A row of zeros gets scale 1. The same rows always give the same bits, on any device.
    """
    work = rows.float().clone()
    quantized = torch.empty(work.shape, dtype=dtype, device=work.device)
    return quantized, quantize_rows_into(work, quantized)


def quantize_rows_into(rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`quantize_rows` without allocating rows: `rows` (fp32) is used up, `out` (fp8) written; returns the scales.

    On the CPU, fp8_cpu's kernels do it in two passes a row, with the same bits; elsewhere (a GPU,
    or a CPU without numba) torch's ops below. amax is max(max, -min), two plain reductions (|x|
    would be a pass and a copy more). The quotient can land a hair above the maximum (the scale
    is rounded), which converts to the maximum: no clamp is needed, as long as the scale is a
    normal number (never the case for a real weight, whose rows are far above 448 x 2^-126).
    """
    scale = torch.empty(rows.shape[:1], dtype=torch.float32, device=rows.device)
    if fp8_cpu.quantize_rows_into(rows, out, scale):  # the same bits, in two passes a row
        return scale
    top = fp8_max(out.dtype)
    amax = torch.maximum(rows.amax(dim=1), rows.amin(dim=1).neg_())
    torch.where(amax > 0, amax / top, torch.ones_like(amax), out=scale).clamp_min_(torch.finfo(torch.float32).tiny)
    out.copy_(rows.div_(scale[:, None]))
    return scale


def dequantize(quantized: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q * s per row, computed in fp32 and given in `dtype`."""
    out = torch.empty(quantized.shape, dtype=torch.float32, device=quantized.device)
    return dequantize_into(out, quantized, scale).to(dtype)


def dequantize_into(out: torch.Tensor, quantized: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`dequantize` into an fp32 buffer (the merge's accumulator), without allocating it."""
    if fp8_cpu.dequantize_into(out, quantized, scale):  # the same values, in one pass
        return out
    factor = widen_into(out, quantized)
    if factor != 1:
        out.mul_(factor)  # exact: the codes' values. Folded into the scale, it overflows from 2^120 on
    return out.mul_(scale.to(out.device, torch.float32, non_blocking=True)[:, None])


def widen_into(out: torch.Tensor, quantized: torch.Tensor) -> float:
    """Write fp8 values into the fp32 `out`, exactly, up to a power-of-two factor returned for the caller to apply.

    A GPU converts natively. On a CPU (where fp8_cpu's kernels do not serve: see dequantize_into),
    torch's fp8 -> fp32 conversion is scalar code (about 0.3 G values/s a core, against 2 or
    more for bf16): each fp8 value is instead read as the fp16 whose bits it fills (e5m2: the
    high byte; e4m3fn: the bits shifted into place, 2^-8 of the value), and fp16 -> fp32 is
    vectorized. Exact for every code but e4m3fn's NaN (read as 480; the kernels give NaN), which
    no weight holds (files are checked, quantization never makes it).
    """
    if out.device.type != "cpu":
        out.copy_(quantized.to(out.device, non_blocking=True))
        return 1.0
    bits = thread_buffer("fp8 bits", quantized.numel(), torch.int16).view(quantized.shape)
    bits.copy_(quantized.view(torch.int8))  # sign-extended
    if quantized.dtype == torch.float8_e5m2:
        out.copy_(bits.bitwise_left_shift_(8).view(torch.float16))
        return 1.0
    # s eeee mmm -> s 0eeee mmm 0000000: the shift carries the sign's extension into bit 14, cleared here
    out.copy_(bits.bitwise_left_shift_(7).bitwise_and_(-16385).view(torch.float16))  # -16385: 0xBFFF
    return 256.0


class Fp8Linear(torch.nn.Module):
    """A linear layer whose weight is fp8 rows (e4m3fn, or a file's e5m2), each with an fp32 scale (`weight_scale`)."""

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
    def of(cls, linear: torch.nn.Linear, matmul: str, device: torch.device | None = None) -> Fp8Linear:
        """`linear` quantized (its bias kept as it is), on `device` (default: where it is)."""
        with torch.no_grad():
            quantized, scale = quantize_rows(linear.weight.detach().to(device))
            bias = None if linear.bias is None else linear.bias.detach().to(device)
        return cls(quantized, scale, bias, matmul)

    @property
    def scaled(self) -> bool:
        """Whether this layer's matmul is the scaled fp8 one: asked for, and within CUDA's rules for it."""
        return self.matmul == "scaled" and scaled_layout_ok(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scaled:
            return scaled_linear(x, self.weight, self.weight_scale, self.bias)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, dequantize(self.weight, self.weight_scale, x.dtype), bias)

    def extra_repr(self) -> str:
        kind = str(self.weight.dtype).removeprefix("torch.")
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}, matmul={self.matmul}"


# ------------------------------------------------------------------ the scaled matmul and CUDA's rules for it


class ScaledMatmulRefused(RuntimeError):
    """What CUDA's `_scaled_mm` would raise for these operands (a RuntimeError, as CUDA's own)."""


def scaled_layout_ok(weight: torch.Tensor) -> bool:
    """The weight-side rules: CUDA's row-wise kernel takes float8_e4m3fn weights, both sizes multiples of 16."""
    return weight.dtype == FP8 and weight.dim() == 2 and weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0


def check_scaled_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> None:
    """Raise where CUDA's `torch._scaled_mm` with row-wise scales would, whatever device this runs on.

    From PyTorch's aten/src/ATen/native/cuda/ScaledBlas.cpp (`_scaled_mm_out_cuda`) and
    RowwiseScaledMM.cu (`check_inputs`), the strictest of its paths (CUTLASS on sm_89 and
    sm_10x; sm_90 with cuBLAS before 12.9): mat1 e4m3fn or e5m2 and row-major, mat2 e4m3fn and
    column-major, its sizes and mat1's inner one multiples of 16; fp32 scales of shape (M, 1)
    and (1, N), contiguous; bf16 output only; a bias 1-D bf16 of N, and never with fp32 output.
    """
    problems = []
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        problems.append(f"mat1 {tuple(a.shape)} and mat2 {tuple(b.shape)} are not matrices that multiply")
    else:
        m, n = a.shape[0], b.shape[1]
        if a.dtype not in FP8_DTYPES or b.dtype != FP8:
            problems.append(f"row-wise scaling takes mat1 e4m3fn or e5m2 and mat2 e4m3fn, not {a.dtype}, {b.dtype}")
        if a.shape[1] % 16 or b.shape[0] % 16 or b.shape[1] % 16:
            problems.append(f"mat1 {tuple(a.shape)} and mat2 {tuple(b.shape)}: sizes must be divisible by 16")
        if a.stride(1) != 1 or b.stride(0) != 1:
            problems.append("mat1 must be row-major and mat2 column-major")
        for name, scale, shape, unit in (("scale_a", scale_a, (m, 1), 0), ("scale_b", scale_b, (1, n), 1)):
            if scale.dtype != torch.float32 or tuple(scale.shape) != shape or scale.stride(unit) != 1:
                problems.append(f"{name} must be float32 of shape {shape}, contiguous")
        if out_dtype != SCALED_OUT:
            problems.append(f"row-wise scaling outputs bfloat16 only, not {out_dtype}")
        if bias is not None:
            if out_dtype == torch.float32:
                problems.append("Bias is not supported when out_dtype is set to Float32")
            if bias.dtype != torch.bfloat16 or bias.dim() != 1 or bias.shape[0] != n or bias.stride(0) != 1:
                problems.append(f"the bias must be 1-D bfloat16 of {n}, not {bias.dtype} {tuple(bias.shape)}")
    if problems:
        raise ScaledMatmulRefused("torch._scaled_mm on CUDA refuses this: " + "; ".join(problems))


def quantize_tokens(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3fn rows, fp32 scale per row): each token's scale a power of two at or above amax / 448.

    A power of two makes the division exact in any float dtype. It is never below the
    smallest normal of the rows' dtype: 2^-126 underflows to zero in fp16, and an all-zero
    token would then be 0 / 0.
    """
    amax = rows.abs().amax(dim=1, keepdim=True).float()
    floor = torch.finfo(rows.dtype).tiny
    token_scale = torch.exp2(torch.ceil(torch.log2(torch.clamp(amax / FP8_MAX, min=floor))))
    quantized = (rows / token_scale.to(rows.dtype)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return quantized, token_scale


def _quantized_input(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_tokens` of x's rows, once for the same unchanged tensor: attention's q, k and v take one input.

    Kept on the tensor itself with its version, so it lives exactly as long as the input, and
    a tensor changed in place is quantized afresh. A compiled graph needs no help (the
    compiler merges the repeats), and inference tensors carry no version: both are quantized
    each time.
    """
    rows = x.reshape(-1, x.shape[-1])
    if torch.compiler.is_compiling() or x.is_inference():
        return quantize_tokens(rows)
    kept = getattr(x, "_wanlora_fp8_input", None)
    if kept is not None and kept[0] == x._version:
        return kept[1], kept[2]
    quantized, token_scale = quantize_tokens(rows)
    x._wanlora_fp8_input = (x._version, quantized, token_scale)  # type: ignore[attr-defined]
    return quantized, token_scale


def scaled_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """x @ (weight * scale).T + bias as one fp8 x fp8 matmul, x quantized per token on the fly.

    The kernel gives bf16; a bias in bf16 is fused, any other is added after, in x's dtype.
    """
    quantized, token_scale = _quantized_input(x)
    fused = bias is not None and bias.dtype == x.dtype == SCALED_OUT
    mat2, scale_b, fused_bias = weight.t(), scale.view(1, -1), bias if fused else None
    check_scaled_mm(quantized, mat2, token_scale, scale_b, fused_bias, SCALED_OUT)
    out = torch._scaled_mm(
        quantized, mat2, scale_a=token_scale, scale_b=scale_b, bias=fused_bias, out_dtype=SCALED_OUT
    ).to(x.dtype)
    if bias is not None and not fused:
        out = out + bias.to(x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def scaled_matmul_failure(device: torch.device) -> str | None:
    """Why the scaled fp8 matmul cannot serve on `device`, or None: its real kernel is run once, at a block
    linear's layout (an all-zero token and a bias included), and its result checked against weight-only."""
    return _probe(device.type, device.index)


@functools.cache
def _probe(device_type: str, index: int | None) -> str | None:
    device = torch.device(device_type) if index is None else torch.device(device_type, index)
    generator = torch.Generator().manual_seed(0)
    try:
        x = torch.randn(48, 64, generator=generator).to(device, SCALED_OUT)
        x[5] = 0
        weight, scale = quantize_rows(torch.randn(32, 64, generator=generator).to(device) * 0.05)
        bias = torch.randn(32, generator=generator).to(device, SCALED_OUT)
        got = scaled_linear(x, weight, scale, bias).float()
        want = F.linear(x.float(), dequantize(weight, scale), bias.float())
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as exc:
        return f"raises {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
    if not bool(torch.isfinite(got).all()):
        return "gives NaN or infinity"
    error = float((got - want).abs().max() / want.abs().max())
    return f"is off by {error:.0%} of the largest output" if error > 0.1 else None


def choose_matmul(requested: str, device: torch.device) -> str:
    """ "scaled" where the real kernel works on `device` (probed once), else "weight-only" and the log says why."""
    if requested not in MATMULS:
        raise InvalidInput("fp8 matmul", requested, f"one of {', '.join(MATMULS)}")
    if requested == "weight-only" or (requested == "auto" and device.type != "cuda"):
        return "weight-only"
    failure = scaled_matmul_failure(device)
    if failure is None:
        return "scaled"
    if requested == "scaled":
        raise InvalidInput("fp8 matmul", requested, f"auto or weight-only: on {device} the scaled kernel {failure}")
    logger.info("fp8: weight-only matmuls on %s: the scaled fp8 kernel %s", device, failure)
    return "weight-only"


# ------------------------------------------------------------------ making and finding fp8 layers


def quantize_transformer(
    transformer: torch.nn.Module, matmul: str = "weight-only", device: torch.device | None = None
) -> int:
    """Replace every block linear of `transformer` by its Fp8Linear, one layer at a time; return how many.

    `device`: where to quantize and keep the fp8 layers (where the weights will live, when that
    is a GPU: the work is there, and the full-precision weights never go there whole).
    """
    return FORMAT.convert_transformer(transformer, matmul, device)


def fp8_layers(module: torch.nn.Module) -> dict[str, Fp8Linear]:
    """Every Fp8Linear in `module`, by the name of its weight parameter."""
    return {f"{name}.weight": layer for name, layer in module.named_modules() if isinstance(layer, Fp8Linear)}


def set_matmul(module: torch.nn.Module, matmul: str) -> None:
    for layer in fp8_layers(module).values():
        layer.matmul = matmul


def describe_matmuls(module: torch.nn.Module) -> str:
    """How many fp8 layers compute scaled and how many weight-only, and why not scaled, for the log."""
    layers = list(fp8_layers(module).values())
    scaled = sum(layer.scaled for layer in layers)
    unscaled = [layer for layer in layers if layer.matmul == "scaled" and not layer.scaled]
    why = ""
    if unscaled:
        dtypes = sorted({str(layer.weight.dtype).removeprefix("torch.") for layer in unscaled})
        why = f" ({len(unscaled)} by CUDA's rules for the scaled kernel: e4m3fn weights, sizes by 16; these: "
        why += f"{', '.join(dtypes)})"
    return f"{scaled} scaled, {len(layers) - scaled} weight-only{why}"


# ------------------------------------------------------------------ the format, as the rest of the package sees it


class Fp8Format(WeightFormat):
    """fp8 rows with an fp32 scale per row; a merge recomputes each row's scale from the fp32 sum, then rounds
    once (`quantize_rows_into`)."""

    name = "fp8"
    layer_type = Fp8Linear
    planned_matmul = "scaled"  # fp8 x fp8 matmuls: the GPU path, and the one with more activations

    files = CONVENTIONS  # ComfyUI's and Kijai's fp8 files

    def layer_from_file(
        self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, matmul: str
    ) -> torch.nn.Module:
        return Fp8Linear(weight, scale, bias, matmul)

    def stores(self, dtype: torch.dtype) -> bool:
        return dtype in FP8_DTYPES

    def convert(self, linear: torch.nn.Linear, matmul: str, device: torch.device | None = None) -> torch.nn.Module:
        return Fp8Linear.of(linear, matmul, device)

    def stored(self, layer: torch.nn.Module) -> Stored:
        assert isinstance(layer, Fp8Linear)
        return Stored(self, (layer.weight, layer.weight_scale))

    def encode_into(self, rows: torch.Tensor, target: tuple[torch.Tensor, ...]) -> None:
        weight, scale = target  # the fp32 rows are used up here: the accumulator is refilled for the next chunk
        scale.copy_(quantize_rows_into(rows, weight))

    def decode_into(self, out: torch.Tensor, source: tuple[torch.Tensor, ...]) -> None:
        dequantize_into(out, source[0], source[1])

    def peak(self, tensors: tuple[torch.Tensor, ...]) -> float:
        weight, scale = tensors
        return float(scale.max()) * fp8_max(weight.dtype) if scale.numel() else 0.0

    def limit(self, tensors: tuple[torch.Tensor, ...]) -> float:
        return float(torch.finfo(torch.float32).max)  # the scale absorbs any range

    def from_file(
        self, rows: torch.Tensor, scale: torch.Tensor | None, like: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, ...] | None:
        if scale is None or rows.dtype != like[0].dtype:
            return None  # fp8 in the file, dequantized or requantized at load: a computed W0, not one to read back
        return rows, scale

    def activation_bytes_per_token(self, dim: int, ffn_dim: int) -> float:
        """The scaled matmul's quantized activations: the FFN's, and attention's input (quantized once for q, k
        and v, and kept while that input lives); constants traced on `meta` (tests/test_memory_plan.py)."""
        return PER_TOKEN_FFN * ffn_dim + PER_TOKEN_DIM * dim

    def choose_matmul(self, requested: str, device: torch.device) -> str:
        return choose_matmul(requested, device)

    def set_matmul(self, module: torch.nn.Module, matmul: str) -> None:
        set_matmul(module, matmul)

    def describe(self, module: torch.nn.Module) -> str:
        return describe_matmuls(module)


PER_TOKEN_FFN, PER_TOKEN_DIM = 2, 1.1  # bytes per token and FFN (model) width: see activation_bytes_per_token

FORMAT = Fp8Format()
