"""The GPU run: random weights at the real Wan shapes, in sections ordered by value.

One 14B transformer is made once, straight in bf16 on the GPU (28.6 GB), and every section
uses it; what a section adds (an fp8 copy of the block linears, the text encoder and VAE, a
second expert) goes when the section ends. Each section runs under its own time limit, and
every row is written to $OUT/gpu_results.json and .md the moment it is measured, with the
section's peak GPU and host memory, so a run that is stopped brings back all it measured.

1. step-14b-480p: one 14B forward at 480p, 81 frames, per attention backend (torch's SDPA
   as it dispatches, its cuDNN, flash and memory-efficient kernels, and xformers), each row
   naming the kernel that ran; and CFG's two passes as one batch of two;
2. fp8-14b: the same weights' block linears in fp8: the forward with fp8 x fp8 matmuls and
   weight-only, and the error of each against bf16;
3. compile-14b-480p: the forward with each block compiled (torch.compile, inductor);
4. e2e-14b-480p-4step: a 4-step 480p 81-frame video at guidance 1, wanlora's `generate`
   against diffusers' `WanPipeline` on the same random components, in the same run;
5. swap-14b: a LoRA swap between two rank-32 LoRAs on all 400 block linears, bf16 and fp8;
6. step-14b-720p: one forward at 720p;
7. pinned-bandwidth: host-to-GPU and back, from a registered arena, `pin_memory` and pageable memory;
8. a14b-switch: Wan2.2 A14B's expert switch (`offload="experts"`): a second 14B expert in
   pinned host memory, the switch each way, with and without copying back.

`--rehearse` runs every section on the CPU at tiny shapes through the same code, and then
accounts for the real run at real shapes on `meta`: each section's time from its FLOPs and
bytes (the assumptions are in ACCOUNTING), its peak GPU memory (weights counted, activations
traced) and host memory; the test asserts the whole run fits 8 minutes, 70 GB of GPU memory
and 100 GB of host memory.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
import logging
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.results import Results, out_dir
from tests.builders import forward_flops, lora_tensors, materialize, random_transformer, step_inputs
from wanlora.lora.layouts import read_lora
from wanlora.lora.merge import LoraMerger
from wanlora.lora.state import TransformerLoras
from wanlora.models import CATALOGUE, TINY_ARCH, UMT5_XXL, WAN_14B, Architecture, ModelSpec, tiny_spec
from wanlora.runtime.attention import BACKENDS, install_backend, unavailable_reason
from wanlora.runtime.placement import ExpertSwitch
from wanlora.tiny import TINY_TEXT_CONFIG
from wanlora.weights.host_memory import HostArena

LIGHTX2V_H200 = 14.0  # seconds: LightX2V's published 4-step I2V 480p on an H200
TINY_VAE = {"base_dim": 3, "z_dim": 16, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1}
ATTENTION = ("sdpa", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "xformers")
GB = 1e9


@dataclasses.dataclass
class Setup:
    """What differs between the GPU run and its CPU rehearsal; the code is the same."""

    device: torch.device
    dtype: torch.dtype
    arch: Architecture
    spec: ModelSpec
    sizes: dict[str, tuple[int, int]]  # (height, width)
    frames: int
    repeats: int
    compile_backend: str
    text_config: dict
    vae_config: dict
    matmul_size: int
    bandwidth_bytes: int

    @classmethod
    def make(cls, rehearse: bool) -> Setup:
        if rehearse:
            tiny_sizes = {"480p": (64, 112), "720p": (96, 176)}
            return cls(torch.device("cpu"), torch.float32, TINY_ARCH, tiny_spec(), tiny_sizes,
                       9, 1, "aot_eager", {"vocab_size": 64, **TINY_TEXT_CONFIG}, TINY_VAE, 256, 2**24)  # fmt: skip
        return cls(torch.device("cuda"), torch.bfloat16, WAN_14B, CATALOGUE["t2v-14b"], {"480p": (480, 832),
                   "720p": (720, 1280)}, 81, 2, "inductor", UMT5_XXL, {}, 8192, 2 * 2**30)  # fmt: skip

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


class Bench:
    """The shared model and the measuring: each section's rows go to the results as they are measured."""

    def __init__(self, setup: Setup, results: Results) -> None:
        self.setup, self.results = setup, results
        self.section: dict = {}
        self.model = random_transformer(setup.arch, dtype=setup.dtype, device=str(setup.device))

    def inputs(self, resolution: str = "480p", batch: int = 1) -> dict[str, torch.Tensor]:
        height, width = self.setup.sizes[resolution]
        device = str(self.setup.device)
        return step_inputs(self.setup.arch, self.setup.frames, height, width, batch, self.setup.dtype, device)

    def flops(self, resolution: str = "480p", batch: int = 1) -> float:
        height, width = self.setup.sizes[resolution]
        return batch * forward_flops(self.setup.arch, self.setup.frames, height, width)

    def sync(self) -> None:
        if self.setup.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], object], repeats: int | None = None, warmup: int = 1) -> float:
        """Median seconds of `fn` after `warmup` calls (the GPU synchronized around each)."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats or self.setup.repeats):
            self.sync()
            started = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    def row(self, **row: object) -> None:
        self.results.row(self.section, row)

    def note(self, note: str) -> None:
        self.results.note(self.section, note)

    def step_row(self, case: str, attention: str, seconds: float, flops: float, **more: object) -> None:
        self.row(
            case=case,
            attention=attention,
            **{"s/forward": f"{seconds:.3f}", "TFLOP/s": f"{flops / seconds / 1e12:.1f}"},
            **more,
        )

    def forward(self, model: torch.nn.Module, inputs: dict) -> Callable[[], object]:
        return lambda: model(**inputs, return_dict=False)


# ---------------------------------------------------------------------------- what ran, and how much memory


def attention_kernel(bench: Bench, backend: str) -> str:
    """The kernel that computes attention for `backend` at the 480p step's shapes, as the profiler saw it."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    arch, setup = bench.setup.arch, bench.setup
    tokens = bench.inputs()["hidden_states"][0, 0].numel() // 4  # latent cells in 2x2 patches
    query = torch.randn(
        1, tokens, arch.num_attention_heads, arch.attention_head_dim, device=setup.device, dtype=setup.dtype
    )
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if setup.cuda else [])
    with torch.profiler.profile(activities=activities) as profile:
        dispatch_attention_fn(query, query, query, backend=BACKENDS[backend].dispatcher_name)
        bench.sync()
    events = profile.key_averages()
    if setup.cuda:
        kernels = [
            e for e in events if e.self_device_time_total > 0 and not e.key.startswith(("aten::", "Memcpy", "Memset"))
        ]
        chosen = max(kernels, key=lambda e: e.self_device_time_total, default=None)
    else:
        chosen = max((e for e in events if "attention" in e.key), key=lambda e: len(e.key), default=None)
    return chosen.key[:90] if chosen is not None else "unknown"


def sdpa_choice(bench: Bench) -> str:
    """The kernel torch's SDPA dispatcher picks for the 480p step's attention."""
    arch, setup = bench.setup.arch, bench.setup
    tokens = bench.inputs()["hidden_states"][0, 0].numel() // 4
    query = torch.empty(
        1, arch.num_attention_heads, tokens, arch.attention_head_dim, device=setup.device, dtype=setup.dtype
    )
    return torch.nn.attention.SDPBackend(torch._fused_sdp_choice(query, query, query)).name


def reset_peaks(setup: Setup) -> None:
    if setup.cuda:
        torch.cuda.reset_peak_memory_stats()
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set (VmHWM)


def peaks(setup: Setup) -> dict[str, str]:
    """This section's peak GPU memory (the caching allocator's) and peak resident host memory, pinned included."""
    found = {}
    if setup.cuda:
        found["peak GPU GB"] = f"{torch.cuda.max_memory_allocated() / GB:.1f}"
    with contextlib.suppress(OSError, StopIteration):
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
        found["peak host GB"] = f"{int(line.split()[1]) * 1024 / GB:.1f}"
    return found


def twin(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A transformer like `model`, built on `meta` and given `tensors` as its own (no copy is made here)."""
    with torch.device("meta"):
        made = type(model).from_config(model.config)
    made.load_state_dict(tensors, assign=True)
    made.rope = model.rope  # its tables are buffers it computes, not state
    return made.eval().requires_grad_(False)


def fp8_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The model with its block linears in fp8, made a layer at a time: everything else is the model's own
    tensors, shared, so the copy costs the fp8 block linears alone."""
    from wanlora.weights.formats.fp8 import quantize_transformer

    copied = twin(model, model.state_dict())
    quantize_transformer(copied, "scaled" if next(model.parameters()).is_cuda else "weight-only")
    return copied


# ---------------------------------------------------------------------------- the sections


def step_14b_480p(bench: Bench) -> None:
    """One warm-up, then each kernel once (cuDNN's after a warm-up of its own: it builds a plan first)."""
    model, inputs, flops = bench.model, bench.inputs(), bench.flops()
    device = bench.setup.device
    model(**inputs, return_dict=False)
    for backend in ATTENTION:
        reason = unavailable_reason(backend, device)
        if reason is not None:
            bench.note(f"{backend}: not available here ({reason})")
            continue
        try:
            install_backend(model, backend)
            warmup = 1 if backend == "sdpa-cudnn" else 0
            seconds = bench.time(bench.forward(model, inputs), repeats=1, warmup=warmup)
            kernel = attention_kernel(bench, backend)
        except Exception as exc:  # a kernel that refuses these shapes is a result, not a crash
            bench.note(f"{backend}: failed ({type(exc).__name__}: {str(exc)[:160]})")
            continue
        bench.step_row("14B 480p", backend, seconds, flops, kernel=kernel)
    install_backend(model, "sdpa")
    pair = bench.time(bench.forward(model, bench.inputs(batch=2)), repeats=1, warmup=0)
    bench.step_row("14B 480p, CFG's two passes as one batch of two", "sdpa", pair, bench.flops(batch=2))


def fp8_14b(bench: Bench) -> None:
    from wanlora.weights.formats.fp8 import set_matmul

    model, inputs, flops = bench.model, bench.inputs(), bench.flops()
    reference = model(**inputs, return_dict=False)[0].float()
    quantized = fp8_copy(model)
    matmuls = ("scaled", "weight-only") if bench.setup.cuda else ("weight-only",)
    for matmul in matmuls:  # the weight-only path's matmuls are the bf16 ones, already warm
        set_matmul(quantized, matmul)
        kept: dict[str, torch.Tensor] = {}
        seconds = bench.time(
            lambda kept=kept: kept.update(out=quantized(**inputs, return_dict=False)[0]),
            repeats=1,
            warmup=int(matmul == "scaled"),
        )
        out = kept.pop("out").float()
        error = float((out - reference).norm() / reference.norm())
        bench.step_row(f"14B 480p fp8 {matmul}", "sdpa", seconds, flops, error=f"{error:.4f}")
    fp8_bytes = sum(t.numel() * t.element_size() for n, t in quantized.state_dict().items() if n.startswith("blocks."))
    bench.note(f"fp8 block linears {fp8_bytes / GB:.1f} GB beside the bf16 model; error: relative L2 against bf16")


def compile_14b_480p(bench: Bench) -> None:
    """Each block's forward compiled (as `compile=True` does), then put back: the later sections run eager."""
    from wanlora.pipeline import compile_blocks

    model, inputs = bench.model, bench.inputs()
    started = time.perf_counter()
    compile_blocks(model, bench.setup.compile_backend, fullgraph=True)
    try:
        model(**inputs, return_dict=False)
        bench.sync()
        compiling = time.perf_counter() - started
        seconds = bench.time(bench.forward(model, inputs), repeats=1, warmup=0)
        bench.step_row("14B 480p compiled", "sdpa", seconds, bench.flops(), **{"compile s": f"{compiling:.0f}"})
    finally:
        for block in model.blocks:
            del block.forward  # the class's own again
    bench.note(f"torch.compile backend {bench.setup.compile_backend}, one graph for every block, fullgraph")


def e2e_14b_480p_4step(bench: Bench) -> None:
    """wanlora's generate and diffusers' WanPipeline, the same components, 4 steps at guidance 1."""
    from diffusers import AutoencoderKLWan, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    from wanlora.pipeline import WanLoraPipeline
    from wanlora.tiny import flow_scheduler, tiny_tokenizer

    setup = bench.setup
    with torch.device("meta"):
        encoder = UMT5EncoderModel(UMT5Config(**setup.text_config))
        vae = AutoencoderKLWan(**setup.vae_config)
    materialize(encoder, str(setup.device), lambda _: setup.dtype)
    materialize(vae, str(setup.device), lambda _: torch.float32)
    pipe = WanPipeline(
        tokenizer=tiny_tokenizer(), text_encoder=encoder, vae=vae, scheduler=flow_scheduler(), transformer=bench.model
    )
    pipe.set_progress_bar_config(disable=True)
    ours = WanLoraPipeline(pipe, setup.spec, setup.device, attention="sdpa")
    height, width = setup.sizes["480p"]
    request = {
        "height": height,
        "width": width,
        "num_frames": setup.frames,
        "num_inference_steps": 4,
        "guidance_scale": 1.0,
    }
    vae.decode(torch.zeros(1, 16, 1, height // 8, width // 8, device=setup.device))  # both runs find the VAE warm
    prompt = "a fox walks through fresh snow"

    def theirs() -> None:
        pipe(prompt, generator=torch.Generator("cpu").manual_seed(0), output_type="np", **request)

    def wanlora() -> None:
        ours.generate(prompt, seed=0, progress=False, **request)

    diffusers_seconds = bench.time(theirs, repeats=1, warmup=0)
    bench.row(run="diffusers WanPipeline, 4 steps at guidance 1, 480p, 81 frames", seconds=f"{diffusers_seconds:.1f}")
    wanlora_seconds = bench.time(wanlora, repeats=1, warmup=0)
    bench.row(
        run="wanlora generate, the same",
        seconds=f"{wanlora_seconds:.1f}",
        **{"speed vs diffusers": f"{diffusers_seconds / wanlora_seconds:.2f}x"},
    )
    bench.row(run="LightX2V on H200, published: 4-step I2V 480p", seconds=LIGHTX2V_H200)
    bench.note("random UMT5-XXL, Wan2.1 VAE (fp32) and 14B transformer at the real shapes; sdpa; the VAE untiled")


def timed_swaps(bench: Bench, model: torch.nn.Module, folder: Path, repeats: int) -> tuple[float, int]:
    """Seconds per swap between two rank-32 LoRAs on every block linear of `model`, and how many linears."""
    paths = []
    for seed in (1, 2):
        path = folder / f"{seed}.safetensors"
        if not path.exists():
            shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
            tensors, _ = lora_tensors(shapes, "original", rank=32, seed=seed, dtype=torch.bfloat16, with_deltas=False)
            save_file(tensors, path)
        paths.append(path)
    loras = [read_lora(path) for path in paths]
    merger = LoraMerger(model)
    merger.write(merger.prepare([(loras[1], 1.0)]))  # the first merge also makes the pristine copies
    turn = {"next": 0}

    def swap() -> None:
        merger.write(merger.prepare([(loras[turn["next"] % 2], 1.0)]))
        turn["next"] += 1

    seconds = bench.time(swap, repeats=repeats, warmup=0)
    merger.write(merger.prepare([]))
    return seconds, sum(1 for name in loras[0].deltas if name.startswith("blocks."))


def swap_14b(bench: Bench) -> None:
    with tempfile.TemporaryDirectory() as folder:
        seconds, linears = timed_swaps(bench, bench.model, Path(folder), repeats=3)
        bench.row(swap=f"bf16: two rank-32 LoRAs on all {linears} block linears", seconds=f"{seconds:.2f}")
        gc.collect()  # the bf16 pristine copies go before the fp8 ones come
        quantized = fp8_copy(bench.model)
        seconds, _ = timed_swaps(bench, quantized, Path(folder), repeats=2)
        bench.row(swap="fp8: the same", seconds=f"{seconds:.2f}")
    bench.note("the first merge of each (making the host copies of W0) is not timed")


def step_14b_720p(bench: Bench) -> None:
    seconds = bench.time(bench.forward(bench.model, bench.inputs("720p")), repeats=1, warmup=0)
    bench.step_row("14B 720p", "sdpa", seconds, bench.flops("720p"))


def pinned_bandwidth(bench: Bench) -> None:
    """Host to GPU and back for one buffer: from an arena (registered pages), pin_memory, and pageable memory."""
    setup = bench.setup
    size = setup.bandwidth_bytes
    source = {"x": torch.empty(size, dtype=torch.uint8)}
    started = time.perf_counter()
    arena = HostArena(source, pin=setup.cuda, fill=False)
    register = time.perf_counter() - started
    gpu = torch.empty(size, dtype=torch.uint8, device=setup.device)
    hosts = {"arena (registered pages)": arena.views["x"], "pageable": source["x"]}
    if setup.cuda:
        hosts["pin_memory (caching allocator)"] = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    for name, host in hosts.items():
        up = bench.time(lambda host=host: gpu.copy_(host, non_blocking=True), repeats=3)
        down = bench.time(lambda host=host: host.copy_(gpu, non_blocking=True), repeats=3)
        bench.row(
            host=name,
            **{
                "GB": f"{size / GB:.2f}",
                "to GPU GB/s": f"{size / up / GB:.1f}",
                "to host GB/s": f"{size / down / GB:.1f}",
            },
        )
    bench.note(f"registering {size / GB:.2f} GB of pages took {register:.2f} s")


def a14b_switch(bench: Bench) -> None:
    """Wan2.2 A14B with offload="experts": the shared model as one expert, a copy of it as the other."""
    setup, model = bench.setup, bench.model
    other = twin(model, {n: t.clone() for n, t in model.state_dict().items()})
    states = [TransformerLoras(model), TransformerLoras(other)]
    started = time.perf_counter()
    switch = ExpertSwitch([(model, states[0]), (other, states[1])], setup.device)  # parks the copy on the host
    parking = time.perf_counter() - started
    gb = sum(p.numel() * p.element_size() for p in model.parameters()) / GB
    inputs = bench.inputs()
    try:
        for expert, state, what in ((other, states[1], "first switch: the working expert copied out, the other in"),
                                    (model, states[0], "switch back: nothing changed, so nothing copied out"),
                                    (other, states[1], "and again")):  # fmt: skip
            back = switch.bytes_back
            seconds = bench.time(lambda e=expert, s=state: switch.activate(e, s), repeats=1, warmup=0)
            moved = (switch.bytes_back - back) / GB
            bench.row(
                what=what,
                s=f"{seconds:.2f}",
                **{"GB in": f"{gb:.3g}", "GB out": f"{moved:.3g}", "GB/s in": f"{gb / seconds:.1f}"},
            )
        forward = bench.time(bench.forward(other, inputs), repeats=1, warmup=0)
        bench.row(what="the expert that came in: one forward", s=f"{forward:.2f}")
        bench.note(f"parking the second expert ({gb:.1f} GB into a registered arena) took {parking:.1f} s at load")
    finally:
        if switch.active is not model:  # the shared model back on the GPU, whatever stopped the section
            switch.activate(model, states[0])
        for module in (model, other):  # the switch's hooks: the last section, so nothing else is lost
            module._forward_pre_hooks.clear()


SECTIONS: list[tuple[str, Callable[[Bench], None], int]] = [  # in order of value; each one's limit in seconds
    ("step-14b-480p", step_14b_480p, 60),
    ("fp8-14b", fp8_14b, 40),
    ("compile-14b-480p", compile_14b_480p, 95),
    ("e2e-14b-480p-4step", e2e_14b_480p_4step, 90),
    ("swap-14b", swap_14b, 40),
    ("step-14b-720p", step_14b_720p, 30),
    ("pinned-bandwidth", pinned_bandwidth, 15),
    ("a14b-switch", a14b_switch, 40),
]
STARTUP_SECONDS = 60  # the device call's own seconds: wheels, imports, the 14B model made, the matmul peak
RUN_SECONDS = 480  # the whole run, in the device's 10 minutes a call


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


def environment(setup: Setup) -> dict[str, str]:
    facts = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    for package in ("diffusers", "xformers", "transformers"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            facts[package] = importlib.metadata.version(package)
    if not setup.cuda:
        return {"device": "CPU (rehearsal)", **facts}
    facts["device"] = torch.cuda.get_device_name()
    facts["GPU memory GB"] = f"{torch.cuda.get_device_properties(0).total_memory / GB:.1f}"
    facts["CUDA"] = str(torch.version.cuda)
    facts["cuDNN"] = str(torch.backends.cudnn.version())
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        facts["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip()
    return facts


def matmul_peak(bench: Bench) -> float:
    n = bench.setup.matmul_size
    a = torch.randn(n, n, device=bench.setup.device, dtype=bench.setup.dtype)
    return 2 * n**3 / bench.time(lambda: a @ a, repeats=10, warmup=3) / 1e12


def run_sections(bench: Bench, budget: int) -> None:
    deadline = time.monotonic() + budget
    setup, results = bench.setup, bench.results
    for name, section, limit in SECTIONS:
        left = int(deadline - time.monotonic())
        bench.section = results.start(name)
        if left < 5:
            results.finish(bench.section, "skipped: the run's budget is spent", 0.0)
            continue
        reset_peaks(setup)
        started = time.perf_counter()
        try:
            with time_limit(min(limit, left)):
                section(bench)
            status = "ok"
        except Exception as exc:  # one section's failure (a timeout, out of memory) must not cost the others
            status = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
        gc.collect()  # what the section made goes now
        if setup.cuda:
            torch.cuda.empty_cache()
        results.finish(bench.section, status, time.perf_counter() - started, **peaks(setup))
        print(f"{name}: {status} ({time.perf_counter() - started:.1f} s)", flush=True)
    rows = [row for section in results.data["sections"] for row in section["rows"]]
    kernels = {row["attention"]: row["kernel"] for row in rows if "kernel" in row}
    if "xformers" in kernels:
        fa3 = any(mark in kernels["xformers"].lower() for mark in ("sm90", "fa3", "flash3", "hopper"))
        results.environment(**{"xformers kernel": kernels["xformers"], "xformers ran FA3": "yes" if fa3 else "no"})
    if "sdpa" in kernels:
        results.environment(**{"SDPA kernel that ran": kernels["sdpa"]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rehearse", action="store_true", help="every section on the CPU at tiny shapes, then the accounting"
    )
    parser.add_argument("--budget", type=int, default=RUN_SECONDS - STARTUP_SECONDS, help="seconds for all sections")
    args = parser.parse_args()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    torch.set_grad_enabled(False)
    setup = Setup.make(args.rehearse)
    title = "wanlora GPU run" + (" (CPU rehearsal, tiny shapes)" if args.rehearse else "")
    results = Results(out_dir(), title, fresh=True)
    results.environment(**environment(setup))
    bench = Bench(setup, results)
    results.environment(
        **{"matmul peak": f"{matmul_peak(bench):.1f} TFLOP/s ({setup.dtype})", "SDPA picks": sdpa_choice(bench)}
    )
    print(results.data["environment"], flush=True)
    run_sections(bench, args.budget)
    if args.rehearse:
        from benchmarks.accounting import account

        results.accounting(account())
    print(results.md_path.read_text())


if __name__ == "__main__":
    main()
