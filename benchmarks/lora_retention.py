"""How much of a LoRA survives each quantized format and each way of applying it: fp8 and every GGUF type.

For a 5120x5120 and a 13824x5120 block linear (Wan 14B's attention and FFN-in shapes), random
W0 from a heavy-tailed distribution (Student t with 4 degrees of freedom, std 0.02, each output
channel scaled by a log-normal factor: trained weights have outlier values and channels), and
a rank-32 delta sum(s*dW) scaled to 1%, 3% and 10% of |W0| (Frobenius norms):
- fp8 e4m3 (row-scaled), the file being fp8(W0): the merge rounded to nearest (wanlora's fp8
  merge), or stochastically (wanlora.weights.formats.fp8_stochastic, seeded by the weight's name);
- each GGUF type T, the file being Q_T(W0) with W0' its dequantized weights:
  - requantize: Q_T(W0' + sum(s*dW)), the file's own type (ggml's reference quantizers);
  - unfused: the blocks untouched, y = x W0'^T + sum s (x A^T) B^T (GgufLinear's LoRA terms);
  - promote bf16 / promote fp8: W0' + sum(s*dW) stored in bf16, or in row-scaled fp8 e4m3.
Per way and strength:
- kept: the projection of the change as stored (merged - W0') on sum(s*dW), relative to it
  (1: all of it), and noise: the rest of the change, orthogonal to it, relative to |sum(s*dW)|.
  Unfused has no stored change: its LoRA part is measured on the outputs instead, against
  x sum(s*dW)^T in fp64;
- PSNR of y = x W^T against the exact merge x (W0' + sum(s*dW))^T (fp64), on random activations.
  A bf16 merge's own rounding is the "promote bf16" row;
- the CPU step time of the layer's forward on bf16 activations (weights dequantized to bf16 for
  each call, then the matmul), as a ratio to the bf16 layer's time measured in the same run;
- bytes a weight (unfused: the rank-32 factors in bf16 included).
Quantization is row-wise, so kept, noise and PSNR are measured on `--rows` rows spread over each
matrix; step times on the whole layer (GGUF blocks: those rows' blocks tiled to full size, which
dequantize at the same speed).

    python -m benchmarks.lora_retention [--rows 256] [--tokens 256] [--repeats 2]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from wanlora.weights.formats.fp8 import Fp8Linear, dequantize, quantize_rows
from wanlora.weights.formats.fp8_stochastic import quantize_rows_stochastic
from wanlora.weights.gguf import qtypes
from wanlora.weights.gguf.dequant import dequantize as gguf_dequantize
from wanlora.weights.gguf.linear import GgufLinear
from wanlora.weights.gguf.quantize import quantize as gguf_quantize

SHAPES = ((5120, 5120), (13824, 5120))  # (out, in): self-attention's q/k/v/o; the FFN's first linear
STRENGTHS = (0.01, 0.03, 0.10)
RANK = 32
GGUF_TYPES = (
    qtypes.Q8_0,
    qtypes.Q6_K,
    qtypes.Q5_K,
    qtypes.Q5_1,
    qtypes.Q5_0,
    qtypes.Q4_K,
    qtypes.Q4_1,
    qtypes.Q4_0,
    qtypes.Q3_K,
    qtypes.Q2_K,
)
ACTIVATIONS = 64  # tokens for the PSNR


@dataclass
class Row:
    shape: str
    format: str
    way: str
    bytes_per_weight: float
    seconds: float = math.nan
    kept: dict[float, tuple[float, float, float]] = field(default_factory=dict)  # strength -> (proj, noise, PSNR)


@dataclass
class Sample:
    """W0's sampled rows, the LoRA's factors for them, and activations."""

    w0: torch.Tensor  # (rows, in) fp32
    down: torch.Tensor  # (rank, in)
    up: torch.Tensor  # (rows, rank)
    x: torch.Tensor  # (tokens, in)

    def delta(self, strength: float) -> tuple[torch.Tensor, float]:
        """(sum(s*dW) for these rows, s), with |sum(s*dW)| = strength * |W0|."""
        raw = self.up @ self.down
        scale = strength * float(self.w0.norm()) / float(raw.norm())
        return raw * scale, scale


def heavy_tailed(rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    t = torch.distributions.StudentT(4.0)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    values = t.sample((rows, columns)) / math.sqrt(2.0)  # a t(4) has variance 2
    channels = torch.exp(torch.randn(rows, 1, generator=generator) * 0.3)
    return (values * channels * 0.02).float()


def sample(out_features: int, in_features: int, rows: int, seed: int) -> Sample:
    generator = torch.Generator().manual_seed(seed)
    return Sample(
        w0=heavy_tailed(rows, in_features, generator),
        down=torch.randn(RANK, in_features, generator=generator) / math.sqrt(in_features),
        up=torch.randn(rows, RANK, generator=generator),
        x=torch.randn(ACTIVATIONS, in_features, generator=generator),
    )


def change_kept(change: torch.Tensor, delta: torch.Tensor) -> tuple[float, float]:
    """(projection of `change` on `delta` relative to it, the orthogonal rest relative to |delta|)."""
    change, delta = change.double(), delta.double()
    projection = float((change * delta).sum() / (delta * delta).sum())
    return projection, float((change - projection * delta).norm() / delta.norm())


def psnr(y: torch.Tensor, reference: torch.Tensor) -> float:
    error = float(((y.double() - reference) ** 2).mean())
    return math.inf if error == 0 else 10 * math.log10(float(reference.abs().max()) ** 2 / error)


def merged_row(name: str, data: Sample, file_w0: torch.Tensor, merge: Callable[[torch.Tensor, str], torch.Tensor]):
    """kept, noise and PSNR at each strength, for a way that stores merge(W0' + sum(s*dW))."""
    kept = {}
    for strength in STRENGTHS:
        delta, _ = data.delta(strength)
        stored = merge(file_w0 + delta, name)
        reference = data.x.double() @ (file_w0.double() + delta.double()).t()
        kept[strength] = (*change_kept(stored - file_w0, delta), psnr(data.x @ stored.t(), reference))
    return kept


def unfused_row(data: Sample, blocks: torch.Tensor, qtype: qtypes.QType, file_w0: torch.Tensor):
    """The same, measured on GgufLinear's outputs: its LoRA part against x sum(s*dW)^T."""
    linear = GgufLinear(blocks, qtype)
    plain = linear(data.x)
    kept = {}
    for strength in STRENGTHS:
        delta, scale = data.delta(strength)
        linear.set_lora_terms([(data.up, data.down, scale)])
        y = linear(data.x)
        lora_part = data.x.double() @ delta.double().t()
        reference = data.x.double() @ file_w0.double().t() + lora_part
        kept[strength] = (*change_kept(y - plain, lora_part), psnr(y, reference))
    return kept


def fp8_round(values: torch.Tensor, name: str) -> torch.Tensor:
    return dequantize(*quantize_rows(values))


def fp8_stochastic(values: torch.Tensor, name: str) -> torch.Tensor:
    return dequantize(*quantize_rows_stochastic(values, name))


def bf16_round(values: torch.Tensor, name: str) -> torch.Tensor:
    return values.bfloat16().float()


def requantizer(qtype: qtypes.QType) -> Callable[[torch.Tensor, str], torch.Tensor]:
    return lambda values, name: gguf_dequantize(gguf_quantize(values, qtype), qtype)


# ------------------------------------------------------------------------------------ step times


def best_seconds(step: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` runs after a warm one (first-touch page faults and allocator growth are not the
    step's): on a shared machine, the least disturbed."""
    step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return min(times)


class Timer:
    def __init__(self, out_features: int, in_features: int, tokens: int, repeats: int) -> None:
        self.shape = (out_features, in_features)
        self.repeats = repeats
        generator = torch.Generator().manual_seed(7)
        self.x = torch.randn(tokens, in_features, generator=generator).bfloat16()
        self.up = torch.randn(out_features, RANK, generator=generator).bfloat16()
        self.down = torch.randn(RANK, in_features, generator=generator).bfloat16()

    def dense(self, weight: torch.Tensor) -> float:
        full = self.tiled(weight.bfloat16())
        return best_seconds(lambda: F.linear(self.x, full), self.repeats)

    def fp8(self, weight: torch.Tensor) -> float:
        quantized, scale = quantize_rows(weight)
        layer = Fp8Linear(self.tiled(quantized.view(torch.uint8)).view(quantized.dtype), self.tiled(scale), None)
        return best_seconds(lambda: layer(self.x), self.repeats)

    def gguf(self, blocks: torch.Tensor, qtype: qtypes.QType, unfused: bool) -> float:
        layer = GgufLinear(self.tiled(blocks), qtype)
        if unfused:
            layer.set_lora_terms([(self.up, self.down, 1.0)])
        with torch.no_grad():
            return best_seconds(lambda: layer(self.x), self.repeats)

    def tiled(self, rows: torch.Tensor) -> torch.Tensor:
        copies = -(-self.shape[0] // rows.shape[0])
        return rows.repeat(copies, *[1] * (rows.dim() - 1))[: self.shape[0]].contiguous()


# ------------------------------------------------------------------------------------ the table


def measure(out_features: int, in_features: int, rows: int, tokens: int, repeats: int, types=GGUF_TYPES) -> list[Row]:
    shape = f"{out_features}x{in_features}"
    data = sample(out_features, in_features, rows, seed=out_features)
    timer = Timer(out_features, in_features, tokens, repeats)
    name = f"blocks.0.{shape}.weight"
    lora_bytes = RANK * (out_features + in_features) * 2 / (out_features * in_features)
    fp8_bytes = 1 + 4 / in_features
    bf16_seconds, fp8_seconds = timer.dense(data.w0), timer.fp8(data.w0)
    w0_bf16 = data.w0.bfloat16().float()
    table = [Row(shape, "bf16", "merge", 2.0, bf16_seconds, merged_row(name, data, w0_bf16, bf16_round))]
    w0_fp8 = dequantize(*quantize_rows(data.w0))
    for way, merge in (("round to nearest", fp8_round), ("stochastic", fp8_stochastic)):
        table.append(Row(shape, "fp8 e4m3", way, fp8_bytes, fp8_seconds, merged_row(name, data, w0_fp8, merge)))
    for qtype in types:
        blocks = gguf_quantize(data.w0, qtype)
        file_w0 = gguf_dequantize(blocks, qtype)
        table += [
            Row(
                shape,
                qtype.name,
                "requantize",
                qtype.bytes_per_weight,
                timer.gguf(blocks, qtype, unfused=False),
                merged_row(name, data, file_w0, requantizer(qtype)),
            ),
            Row(
                shape,
                qtype.name,
                "unfused",
                qtype.bytes_per_weight + lora_bytes,
                timer.gguf(blocks, qtype, unfused=True),
                unfused_row(data, blocks, qtype, file_w0),
            ),
            Row(shape, qtype.name, "promote bf16", 2.0, bf16_seconds, merged_row(name, data, file_w0, bf16_round)),
            Row(shape, qtype.name, "promote fp8", fp8_bytes, fp8_seconds, merged_row(name, data, file_w0, fp8_round)),
        ]
    return table


def markdown(table: list[Row]) -> str:
    header = "| shape | format | way | bytes/weight | step ms | × bf16 |"
    header += "".join(f" {s:.0%}: kept / noise / PSNR dB |" for s in STRENGTHS)
    lines = [header, "|" + "---|" * (6 + len(STRENGTHS))]
    baselines = {row.shape: row.seconds for row in table if row.format == "bf16"}
    for row in table:
        cells = [row.shape, row.format, row.way, f"{row.bytes_per_weight:.3f}", f"{row.seconds * 1e3:.0f}"]
        cells.append(f"{row.seconds / baselines[row.shape]:.2f}")
        for strength in STRENGTHS:
            proj, noise, decibels = row.kept[strength]
            cells.append(f"{proj:.3f} / {noise:.3f} / {decibels:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256, help="rows of each matrix for kept, noise and PSNR")
    parser.add_argument("--tokens", type=int, default=256, help="tokens of the timed forward")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each forward (the best is shown)")
    args = parser.parse_args()
    started = time.perf_counter()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {torch.backends.cpu.get_cpu_capability()}"
    )
    print(
        f"W0: Student t(4) x log-normal channel scales, std 0.02; a rank-{RANK} LoRA; {args.rows} rows for kept, noise "
        f"and PSNR ({ACTIVATIONS} tokens); step: {args.tokens} bf16 tokens, best of {args.repeats}\n"
    )
    table = []
    for out_features, in_features in SHAPES:
        table += measure(out_features, in_features, args.rows, args.tokens, args.repeats)
    print(markdown(table))
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
