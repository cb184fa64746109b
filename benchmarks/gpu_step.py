"""The GPU run: random weights at the real Wan shapes, in sections ordered by value.

Each section runs under its own time limit (and the run under an overall budget), and its
results are written to $OUT/gpu_results.json and .md as soon as it ends, so a run that is
stopped still brings back everything finished before. Run it through benchmarks/gpu.sh.

1. step-14b-480p: one denoising step of Wan2.1 14B at 480p, 81 frames, per attention
   backend: seconds, TFLOP/s as a share of the bf16 matmul peak measured first, peak memory;
2. compile-14b-480p: the same step with torch.compile of the repeated blocks;
3. e2e-14b-480p-4step: UMT5-XXL encoding, 4 steps at guidance 1 and the VAE decode, the
   accelerated run, beside LightX2V's published H200 figures;
4. fp8-14b: the same weights in fp8: the step with fp8 matmuls and weight-only, its error
   against bf16, an fp8 LoRA swap, and A14B's two fp8 experts resident for 4 steps;
5. a14b-480p-4step: Wan2.2 A14B's two experts with only the working one on the GPU: the
   switch through pinned host memory, and 4 Lightning steps (2 per expert) with it;
6. swap-14b: a LoRA swap, two rank-32 LoRAs on all 400 block linears;
7. fast-mode-1.3b: 10 steps with First Block Cache off and on;
8. cfg-batch-1.3b: a guided step as two forwards or as one batch of two;
9. step-14b-720p: one step at 720p.

`--rehearse` runs every section on the CPU at tiny shapes through the same code, so that
the first GPU session spends its minutes on numbers, not on an import error.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import signal
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import save_file

from benchmarks.results import Results, out_dir
from tests.builders import forward_flops, lora_tensors, random_transformer, step_inputs
from wanlora.attention import BACKENDS, install_backend, unavailable_reason
from wanlora.fastmode import apply_fast_mode
from wanlora.lora.formats import read_lora
from wanlora.lora.merge import LoraMerger
from wanlora.lora.state import TransformerLoras
from wanlora.memory import ExpertSwitch
from wanlora.models import CATALOGUE, TINY_ARCH, WAN_1_3B, WAN_14B, Architecture
from wanlora.tiny import TINY_TEXT_CONFIG

LIGHTX2V_H200 = {"4-step I2V 480p": 14.0, "40-step FP8 480p": 191.0}  # seconds, LightX2V's published figures
UMT5_XXL = {
    "vocab_size": 256384,
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "feed_forward_proj": "gated-gelu",
}
TINY_VAE = {
    "base_dim": 3,
    "z_dim": 16,
    "dim_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],
}


@dataclasses.dataclass
class Setup:
    """What differs between the GPU run and its CPU rehearsal; the code is the same."""

    device: torch.device
    dtype: torch.dtype
    archs: dict[str, Architecture]
    sizes: dict[str, tuple[int, int]]  # (height, width)
    frames: int
    repeats: int
    compile_backend: str
    text_config: dict
    vae_config: dict
    peak_size: int

    @classmethod
    def make(cls, rehearse: bool, repeats: int) -> Setup:
        if rehearse:
            return cls(torch.device("cpu"), torch.float32, {"14B": TINY_ARCH, "1.3B": TINY_ARCH},
                       {"480p": (64, 112), "720p": (96, 176)}, 9, 1, "aot_eager",
                       {"vocab_size": 64, **TINY_TEXT_CONFIG}, TINY_VAE, 256)  # fmt: skip
        return cls(torch.device("cuda"), torch.bfloat16, {"14B": WAN_14B, "1.3B": WAN_1_3B},
                   {"480p": (480, 832), "720p": (720, 1280)}, 81, repeats, "inductor", UMT5_XXL, {}, 8192)  # fmt: skip


class Bench:
    """The models and measurements the sections share: each model is built once, on first use."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.models: dict[str, torch.nn.Module] = {}
        self.best_forward: float | None = None  # 14B 480p, the fastest backend: for the 40-step estimate
        self.encode_decode: float | None = None  # UMT5 encoding + VAE decode at 480p, from the e2e section
        self.peak = self.matmul_peak()

    def model(self, size: str) -> torch.nn.Module:
        if size not in self.models:
            self.models[size] = random_transformer(
                self.setup.archs[size], dtype=self.setup.dtype, device=str(self.setup.device)
            )
        return self.models[size]

    def inputs(self, size: str, resolution: str, batch: int = 1) -> dict[str, torch.Tensor]:
        height, width = self.setup.sizes[resolution]
        return step_inputs(
            self.setup.archs[size],
            self.setup.frames,
            height,
            width,
            batch=batch,
            dtype=self.setup.dtype,
            device=str(self.setup.device),
        )

    def flops(self, size: str, resolution: str) -> float:
        height, width = self.setup.sizes[resolution]
        return forward_flops(self.setup.archs[size], self.setup.frames, height, width)

    def time(self, fn: Callable[[], object], repeats: int | None = None, warmup: int = 1) -> float:
        """Median seconds of `fn`: CUDA events on the GPU, the wall clock on the CPU."""
        cuda = self.setup.device.type == "cuda"
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats or self.setup.repeats):
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    def matmul_peak(self) -> float:
        n = self.setup.peak_size
        a = torch.randn(n, n, device=self.setup.device, dtype=self.setup.dtype)
        return 2 * n**3 / self.time(lambda: a @ a, repeats=10, warmup=3) / 1e12

    def reset_peak_memory(self) -> None:
        if self.setup.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> str:
        return f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if self.setup.device.type == "cuda" else "-"

    def step_row(self, case: str, backend: str, compiled: str, seconds: float, flops: float) -> dict:
        tflops = flops / seconds / 1e12
        return {
            "case": case,
            "attention": backend,
            "compile": compiled,
            "s/forward": f"{seconds:.3f}",
            "s/step (CFG)": f"{2 * seconds:.3f}",
            "TFLOP/s": f"{tflops:.1f}",
            "of peak": f"{100 * tflops / self.peak:.0f}%",
            "peak GiB": self.peak_gib(),
        }


# ---------------------------------------------------------------------------- the sections


def step_14b_480p(bench: Bench) -> tuple[list[dict], list[str]]:
    model, inputs, flops = bench.model("14B"), bench.inputs("14B", "480p"), bench.flops("14B", "480p")
    rows, notes = [], []
    backends = [name for name in BACKENDS if unavailable_reason(name, bench.setup.device) is None]
    for backend in backends:
        try:
            install_backend(model, backend)
            bench.reset_peak_memory()
            seconds = bench.time(lambda: model(**inputs, return_dict=False))
        except Exception as exc:  # a kernel that refuses these shapes is a result, not a crash
            notes.append(f"{backend}: failed ({type(exc).__name__}: {str(exc)[:120]})")
            continue
        rows.append(bench.step_row("14B 480p", backend, "off", seconds, flops))
        bench.best_forward = min(seconds, bench.best_forward or seconds)
    install_backend(model, "sdpa")
    skipped = [f"{name} ({unavailable_reason(name, bench.setup.device)})" for name in BACKENDS if name not in backends]
    notes.append("not available here: " + (", ".join(skipped) or "none"))
    return rows, notes


def compile_14b_480p(bench: Bench) -> tuple[list[dict], list[str]]:
    """On a model of its own: compiled blocks would recompile at 720p, and that is not what 720p measures."""
    model = random_transformer(bench.setup.archs["14B"], dtype=bench.setup.dtype, device=str(bench.setup.device))
    inputs = bench.inputs("14B", "480p")
    started = time.perf_counter()
    model.compile_repeated_blocks(fullgraph=True, backend=bench.setup.compile_backend)
    model(**inputs, return_dict=False)
    if bench.setup.device.type == "cuda":
        torch.cuda.synchronize()
    compile_seconds = time.perf_counter() - started
    bench.reset_peak_memory()
    seconds = bench.time(lambda: model(**inputs, return_dict=False), warmup=0)
    row = bench.step_row(
        "14B 480p", "sdpa", f"on ({compile_seconds:.0f} s to compile)", seconds, bench.flops("14B", "480p")
    )
    return [row], [f"torch.compile backend {bench.setup.compile_backend}, regional (one block graph)"]


def e2e_14b_480p_4step(bench: Bench) -> tuple[list[dict], list[str]]:
    from transformers import UMT5Config, UMT5EncoderModel

    device, dtype = bench.setup.device, bench.setup.dtype
    with torch.device("meta"):
        encoder = UMT5EncoderModel(UMT5Config(**bench.setup.text_config))
    encoder = encoder.to_empty(device=device).to(dtype).eval()
    for param in encoder.parameters():
        param.data.normal_(0, 0.02)
    vae = AutoencoderKLWan(**bench.setup.vae_config).to(device).eval()
    model, inputs = bench.model("14B"), bench.inputs("14B", "480p")
    tokens = torch.randint(0, bench.setup.text_config["vocab_size"], (1, 512), device=device)
    height, width = bench.setup.sizes["480p"]
    latents = torch.randn(1, 16, (bench.setup.frames - 1) // 4 + 1, height // 8, width // 8, device=device)
    encode = bench.time(lambda: encoder(tokens), repeats=1)
    steps = bench.time(lambda: [model(**inputs, return_dict=False) for _ in range(4)], repeats=1)
    decode = bench.time(lambda: vae.decode(latents), repeats=1, warmup=0)
    total = encode + steps + decode
    bench.encode_decode = encode + decode
    rows = [
        {
            "run": "wanlora, 4 steps at guidance 1, T2V 14B 480p, 81 frames",
            "seconds": f"{total:.1f}",
            "encode / steps / decode": f"{encode:.1f} / {steps:.1f} / {decode:.1f}",
        },
        {"run": "LightX2V on H200, published: 4-step I2V 480p", "seconds": LIGHTX2V_H200["4-step I2V 480p"]},
    ]
    if bench.best_forward is not None:
        forty = encode + 40 * 2 * bench.best_forward + decode
        rows += [
            {"run": "wanlora, 40 steps with CFG, bf16 (estimate from the measured step)", "seconds": f"{forty:.1f}"},
            {"run": "LightX2V on H200, published: 40-step FP8 480p", "seconds": LIGHTX2V_H200["40-step FP8 480p"]},
        ]
    return rows, ["random UMT5-XXL, VAE and transformer at the real shapes; eager, sdpa"]


def a14b_480p_4step(bench: Bench) -> tuple[list[dict], list[str]]:
    """Two 14B experts of their own, the low-noise one in pinned host memory, as offload="experts" runs them."""
    device = bench.setup.device
    experts = [
        random_transformer(bench.setup.archs["14B"], dtype=bench.setup.dtype, device=str(device)) for _ in range(2)
    ]
    states = [TransformerLoras(expert) for expert in experts]
    started = time.perf_counter()
    switch = ExpertSwitch(list(zip(experts, states, strict=True)), device)
    setup_seconds = time.perf_counter() - started
    gb = sum(p.numel() * p.element_size() for p in experts[0].parameters()) / 1e9
    turn = {"next": 1}

    def one_switch() -> None:
        switch.activate(experts[turn["next"]], states[turn["next"]])
        turn["next"] ^= 1

    switch_seconds = bench.time(one_switch, repeats=4, warmup=0)
    inputs = bench.inputs("14B", "480p")
    forward = bench.time(lambda: switch.active(**inputs, return_dict=False), repeats=2)

    def lightning() -> None:  # the pre-hooks switch: to the high-noise expert first, to the low-noise one after 2
        for expert in (experts[0], experts[0], experts[1], experts[1]):
            expert(**inputs, return_dict=False)

    lightning()  # warm, and ending on the low-noise expert as every generation does
    before = switch.switches
    steps = bench.time(lightning, repeats=1, warmup=0)
    per_run = switch.switches - before
    rows = [
        {
            "what": f"expert switch: {gb:.1f} GB out to pinned host memory and {gb:.1f} GB in",
            "seconds": f"{switch_seconds:.2f}",
            "GB/s each way": f"{gb / switch_seconds:.1f}",
        },
        {"what": "one 14B forward at 480p, 81 frames", "seconds": f"{forward:.2f}"},
        {
            "what": f"4 steps at guidance 1, 2 per expert, with {per_run:g} switches",
            "seconds": f"{steps:.2f}",
            "switch share": f"{100 * (steps - 4 * forward) / steps:.0f}%",
        },
    ]
    if bench.encode_decode is not None:
        rows.append(
            {
                "what": "A14B Lightning 480p end to end (the e2e section's encode and decode added)",
                "seconds": f"{steps + bench.encode_decode:.1f}",
            }
        )
    notes = [f"pinning {gb:.1f} GB of host buffers for the waiting expert took {setup_seconds:.1f} s, once per load"]
    return rows, notes


def timed_swaps(bench: Bench, model: torch.nn.Module, repeats: int) -> tuple[float, int]:
    """Seconds per swap between two rank-32 LoRAs on every block linear of `model`, and how many linears."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    with tempfile.TemporaryDirectory() as folder:
        loras = []
        for seed in (1, 2):
            tensors, _ = lora_tensors(shapes, "original", rank=32, seed=seed, dtype=bench.setup.dtype)
            save_file(tensors, Path(folder) / f"{seed}.safetensors")
            loras.append(read_lora(Path(folder) / f"{seed}.safetensors"))
    merger = LoraMerger(model)
    merger.write(merger.prepare([(loras[1], 1.0)]))  # the first merge also makes the pristine copies
    state = {"next": 0}

    def swap() -> None:
        merger.write(merger.prepare([(loras[state["next"] % 2], 1.0)]))
        state["next"] += 1

    seconds = bench.time(swap, repeats=repeats, warmup=0)
    merger.write(merger.prepare([]))
    return seconds, sum(1 for name in loras[0].deltas if name.startswith("blocks."))


def swap_14b(bench: Bench) -> tuple[list[dict], list[str]]:
    seconds, linears = timed_swaps(bench, bench.model("14B"), repeats=4)
    return [{"swap": f"two rank-32 LoRAs on all {linears} block linears", "seconds": f"{seconds:.2f}"}], []


def fp8_14b(bench: Bench) -> tuple[list[dict], list[str]]:
    """The bf16 model's weights in fp8: a step with fp8 matmuls and weight-only, its error, a swap, and A14B's
    two experts resident at once (no switch), 4 Lightning steps."""
    import copy

    from wanlora.fp8 import quantize_transformer, set_matmul

    model, inputs, flops = bench.model("14B"), bench.inputs("14B", "480p"), bench.flops("14B", "480p")
    reference = model(**inputs, return_dict=False)[0].float()
    bf16 = bench.best_forward or bench.time(lambda: model(**inputs, return_dict=False))
    quantized = copy.deepcopy(model)
    quantize_transformer(quantized, "scaled")
    gb = sum(t.numel() * t.element_size() for t in (*quantized.parameters(), *quantized.buffers())) / 1e9
    rows = [bench.step_row("14B 480p bf16", "sdpa", "off", bf16, flops)]
    for matmul in ("scaled", "weight-only"):
        set_matmul(quantized, matmul)
        bench.reset_peak_memory()
        seconds = bench.time(lambda: quantized(**inputs, return_dict=False))
        out = quantized(**inputs, return_dict=False)[0].float()
        error = float((out - reference).norm() / reference.norm())
        rows.append(
            {**bench.step_row(f"14B 480p fp8 {matmul}", "sdpa", "off", seconds, flops), "error": f"{error:.4f}"}
        )
    set_matmul(quantized, "scaled")

    swap_seconds, _ = timed_swaps(bench, quantized, repeats=3)
    rows.append({"case": "fp8 swap: two rank-32 LoRAs, every block linear", "seconds": f"{swap_seconds:.2f}"})

    second = copy.deepcopy(quantized)  # A14B: both fp8 experts resident, as offload="auto" keeps them on 80 GB

    def lightning() -> None:
        for expert in (quantized, quantized, second, second):
            expert(**inputs, return_dict=False)

    steps = bench.time(lightning, repeats=1)
    rows.append({"case": "A14B fp8, both experts resident: 4 steps, no switch", "seconds": f"{steps:.2f}"})
    notes = [
        f"fp8 transformer {gb:.1f} GB; activations quantized per token (power-of-two scales), weights per channel",
        "error: relative L2 of the step's output against the bf16 model's; random weights flatter fp8",
    ]
    return rows, notes


def fast_mode_13b(bench: Bench) -> tuple[list[dict], list[str]]:
    model, inputs = bench.model("1.3B"), bench.inputs("1.3B", "480p")
    spec = CATALOGUE["t2v-1.3b"]

    def ten_steps() -> None:
        model._reset_stateful_cache()
        latents = inputs["hidden_states"]
        for step in range(10):
            t = torch.full_like(inputs["timestep"], 1000.0 * (1 - step / 10))
            with model.cache_context("cond"):
                out = model(**{**inputs, "hidden_states": latents, "timestep": t}, return_dict=False)[0]
            latents = latents - 0.05 * out

    off = bench.time(ten_steps)
    apply_fast_mode(model, spec, "balanced", steps=10)
    on = bench.time(ten_steps)
    apply_fast_mode(model, spec, "off", steps=10)
    row = {"run": "1.3B 480p, 10 steps", "off s": f"{off:.2f}", "balanced s": f"{on:.2f}", "ratio": f"{on / off:.2f}"}
    return [row], ["random weights: how often blocks are skipped on real weights differs"]


def cfg_batch_13b(bench: Bench) -> tuple[list[dict], list[str]]:
    model = bench.model("1.3B")
    single, pair = bench.inputs("1.3B", "480p"), bench.inputs("1.3B", "480p", batch=2)
    two = bench.time(lambda: [model(**single, return_dict=False) for _ in range(2)])
    one = bench.time(lambda: model(**pair, return_dict=False))
    row = {
        "run": "a guided 1.3B 480p step",
        "two forwards s": f"{two:.3f}",
        "one batch of two s": f"{one:.3f}",
        "ratio": f"{one / two:.2f}",
    }
    return [row], []


def step_14b_720p(bench: Bench) -> tuple[list[dict], list[str]]:
    model, inputs = bench.model("14B"), bench.inputs("14B", "720p")
    bench.reset_peak_memory()
    seconds = bench.time(lambda: model(**inputs, return_dict=False), repeats=1)
    return [bench.step_row("14B 720p", "sdpa", "off", seconds, bench.flops("14B", "720p"))], []


SECTIONS: list[tuple[str, Callable[[Bench], tuple[list[dict], list[str]]], int]] = [  # by value; GPU seconds
    ("step-14b-480p", step_14b_480p, 100),
    ("compile-14b-480p", compile_14b_480p, 80),
    ("e2e-14b-480p-4step", e2e_14b_480p_4step, 60),
    ("fp8-14b", fp8_14b, 70),
    ("a14b-480p-4step", a14b_480p_4step, 50),
    ("swap-14b", swap_14b, 30),
    ("fast-mode-1.3b", fast_mode_13b, 30),
    ("cfg-batch-1.3b", cfg_batch_13b, 25),
    ("step-14b-720p", step_14b_720p, 40),
]


class SectionTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    def expire(signum, frame):
        raise SectionTimeout(f"stopped at its {seconds} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(max(1, seconds))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rehearse", action="store_true", help="every section on the CPU at tiny shapes")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--budget", type=int, default=390, help="seconds for all sections together")
    args = parser.parse_args()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    torch.set_grad_enabled(False)
    deadline = time.monotonic() + args.budget
    setup = Setup.make(args.rehearse, args.repeats)
    title = "wanlora GPU run" + (" (CPU rehearsal, tiny shapes)" if args.rehearse else "")
    results = Results(out_dir(), title, fresh=True)
    bench = Bench(setup)
    name = torch.cuda.get_device_name() if setup.device.type == "cuda" else "CPU"
    results.environment(
        device=name,
        torch=torch.__version__,
        matmul_peak=f"{bench.peak:.1f} TFLOP/s ({setup.dtype})",
        date=time.strftime("%Y-%m-%d"),
    )
    print(f"{name}, torch {torch.__version__}, matmul peak {bench.peak:.1f} TFLOP/s", flush=True)
    for title, section, limit in SECTIONS:
        left = int(deadline - time.monotonic())
        if left < 5:
            results.add(title, "skipped: the run's budget is spent", 0.0, [], [])
            continue
        started = time.perf_counter()
        try:
            with time_limit(min(limit, left)):
                rows, notes = section(bench)
            status = "ok"
        except Exception as exc:  # one section's failure (a timeout, out of memory) must not cost the others
            rows, notes, status = [], [], f"failed: {type(exc).__name__}: {str(exc)[:200]}"
        gc.collect()  # a section's models (the A14B experts hold each other through their hooks) go now
        if setup.device.type == "cuda":
            torch.cuda.empty_cache()
        results.add(title, status, time.perf_counter() - started, rows, notes)
        print(f"{title}: {status} ({time.perf_counter() - started:.1f} s)", flush=True)
    print(results.md_path.read_text())


if __name__ == "__main__":
    main()
