"""The `wanlora` command. Every user error prints one line and exits 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .accelerators import ACCELERATORS
from .attention import CHOICES as ATTENTION_CHOICES
from .errors import InvalidInput, WanLoraError
from .models import CATALOGUE, TINY_KINDS, TINY_NAMES, ModelSpec, identify_model, resolve_model
from .parallel import ParallelPlan, launched_by_gpus, launched_by_torchrun, process_rank, world_size
from .request import GenerationSettings, resolve_request
from .settings import (
    ASPECT_RATIOS,
    DEFAULT_QUALITY,
    FAST_MODES,
    OFFLOAD_MODES,
    QUALITY_RANGE,
    RESIZE_MODES,
    RESOLUTIONS,
)

# torch, diffusers and the LoRA engine are imported inside the commands that use them, so
# that --help and input errors answer at once.

MODEL_HELP = (
    f"a catalogue variant ({', '.join(CATALOGUE)}), a Hugging Face repo id, a local diffusers-layout "
    f"folder, or a tiny stand-in ({', '.join(TINY_NAMES)}): random offline models for smoke runs that make "
    "noise, not art"
)
REF_HELP = (
    "owner/repo, owner/repo/file.safetensors, owner/repo@rev/file, a huggingface.co, civitai.com or "
    "replicate.com link, civitai:VERSION_ID, any https:// link to a .safetensors file, or a local path"
)
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+-]*")  # `civitai` in civitai:12345


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_lora_arg(text: str) -> tuple[str, float | tuple[float, ...]]:
    """`REF[:STRENGTH]`: the strength is the text after the last ':' when it is a number.

    A comma-separated list of numbers is a strength schedule (`style.safetensors:1,0.5`).
    A bare scheme such as `civitai:12345` is a reference, not a strength.
    """
    ref, sep, tail = text.rpartition(":")
    if not sep or not ref or SCHEME.fullmatch(ref):
        return text, 1.0
    try:
        values = tuple(float(v) for v in tail.split(","))
    except ValueError:
        return text, 1.0
    return ref, values if len(values) > 1 else values[0]


def add_lora_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="REF[:STRENGTH]",
        help="a LoRA and its strength (default 1), on every transformer; repeat to combine several. A Wan2.2 "
        "high/low pair (a repo or folder holding both files) puts each file on its expert",
    )
    for expert in ("high", "low"):
        parser.add_argument(
            f"--lora-{expert}",
            action="append",
            default=[],
            metavar="REF[:STRENGTH]",
            help=f"a LoRA on Wan2.2 A14B's {expert}-noise expert only",
        )


def requested_loras(args: argparse.Namespace) -> list[tuple[str, float | tuple[float, ...], str]]:
    """--lora, --lora-high and --lora-low as (reference, strength, expert) triples."""
    aimed = [("both", args.lora), ("high", args.lora_high), ("low", args.lora_low)]
    return [(*parse_lora_arg(text), expert) for expert, texts in aimed for text in texts]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="wanlora", description="Wan2.1 and Wan2.2 video generation with LoRAs from anywhere.")
    parser.add_argument("--version", action="version", version=f"wanlora {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens (to stderr)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    gen = commands.add_parser("generate", help="make an MP4 from a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--model", default="t2v-14b", help=MODEL_HELP)
    add_lora_options(gen)
    gen.add_argument("--image", help="start image for image-to-video (i2v models)")
    gen.add_argument("--last-image", help="end image for first-and-last-frame guidance (i2v models)")
    gen.add_argument(
        "--resize",
        choices=RESIZE_MODES,
        default="fit",
        help="how the image meets the frame: fit (crop), pad (letterbox) or stretch; default fit",
    )
    gen.add_argument("--negative-prompt")
    gen.add_argument("--resolution", choices=RESOLUTIONS)
    gen.add_argument("--aspect-ratio", choices=ASPECT_RATIOS)
    gen.add_argument("--width", type=int, help="overrides the preset; give --height too")
    gen.add_argument("--height", type=int)
    gen.add_argument("--frames", type=int, help="4k+1 frames, 5 to 81 (default 81; 121 on ti2v-5b)")
    gen.add_argument("--fps", type=int, help="frames per second, 1 to 60 (default 16; 24 on ti2v-5b)")
    gen.add_argument("--steps", type=int, dest="num_inference_steps", help="denoising steps, 1 to 100")
    gen.add_argument("--guidance", type=float, dest="guidance_scale", help="classifier-free guidance scale, 0 to 20")
    gen.add_argument(
        "--guidance-2",
        type=float,
        dest="guidance_scale_2",
        help="the low-noise expert's guidance on Wan2.2 A14B (default: the model's, or --guidance)",
    )
    gen.add_argument(
        "--shift",
        type=float,
        dest="flow_shift",
        help="flow shift (default: the model's; Wan2.1's 3 at 480p, 5 at 720p)",
    )
    gen.add_argument("--seed", type=int, help="the same seed gives the same video (default: random)")
    gen.add_argument(
        "--quality",
        type=int,
        default=DEFAULT_QUALITY,
        help=f"MP4 quality {QUALITY_RANGE[0]} to {QUALITY_RANGE[1]}, higher is better "
        f"(default {DEFAULT_QUALITY}: H.264 CRF 18)",
    )
    gen.add_argument("--device", help="cuda, cuda:1, cpu ... (default: cuda when available)")
    gen.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES)
    gen.add_argument(
        "--fast-mode",
        choices=FAST_MODES,
        default="off",
        help="skip transformer work on steps that change little (First Block Cache)",
    )
    gen.add_argument(
        "--accelerator",
        choices=list(ACCELERATORS),
        help="stack a step-distillation LoRA and sample as it was trained (4-8 steps, no CFG)",
    )
    gen.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks (GPU)")
    gen.add_argument("--cfg-batch", action="store_true", help="run the guided and unguided passes as one batch of two")
    gen.add_argument(
        "--offload",
        choices=OFFLOAD_MODES,
        default="auto",
        help="save GPU memory: experts (only the working Wan2.2 A14B expert on the GPU; what auto picks for "
        "A14B on a GPU), model (components on demand) or group (blocks streamed)",
    )
    gen.add_argument(
        "--gpus",
        type=int,
        metavar="N",
        help="split each video across N processes, one per GPU (N CPU processes without CUDA); "
        "under torchrun, its process count decides",
    )
    gen.add_argument("--ulysses", type=int, metavar="U", help="Ulysses degree (default: the most the heads allow)")
    gen.add_argument("--ring", type=int, metavar="R", help="ring-attention degree (default: what Ulysses leaves)")
    gen.add_argument(
        "--cfg-parallel", action="store_true", help="run the two guidance passes on two halves of the processes"
    )
    gen.add_argument("-o", "--output", help="the MP4 to write (default: wanlora-SEED.mp4)")

    tiny = commands.add_parser("tiny-model", help="write a tiny random Wan model in the diffusers layout")
    tiny.add_argument("dir")
    tiny.add_argument(
        "--kind",
        choices=list(TINY_KINDS),
        default="t2v",
        help="the variant it stands in for: t2v (Wan2.1), i2v (Wan2.1, with a tiny CLIP), t2v-a14b and i2v-a14b "
        "(Wan2.2, two experts), ti2v-5b (Wan2.2's VAE)",
    )
    tiny.add_argument("--i2v", action="store_const", const="i2v", dest="kind", help="the same as --kind i2v")

    lora = commands.add_parser("lora", help="inspect LoRA files or bake them into a model")
    lora_commands = lora.add_subparsers(dest="lora_command", required=True, parser_class=OneLineParser)
    fetch = lora_commands.add_parser("fetch", help="download and verify a LoRA; print its local path")
    fetch.add_argument("ref", help=REF_HELP)
    inspect = lora_commands.add_parser("inspect", help="show a LoRA's layout, ranks, targets and trigger words")
    inspect.add_argument("ref", help=REF_HELP)
    inspect.add_argument("--model", help="also check coverage against this base model: " + MODEL_HELP)
    inspect.add_argument("--json", action="store_true", help="print JSON")
    merge = lora_commands.add_parser("merge", help="write a diffusers-layout model with LoRAs baked in")
    merge.add_argument("--model", required=True, help=MODEL_HELP)
    add_lora_options(merge)
    merge.add_argument("--out", required=True, help="a new (or empty) folder")
    merge.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="weights dtype (default bf16)")
    cache = commands.add_parser("cache", help="the LoRA download cache (WANLORA_CACHE)")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True, parser_class=OneLineParser)
    cache_commands.add_parser("list", help="show cached LoRAs, most recently used first")
    cache_commands.add_parser("clear", help="delete every cached LoRA and unfinished download")
    return parser


def cmd_generate(args: argparse.Namespace) -> int | None:
    options = {
        "negative_prompt": args.negative_prompt,
        "resolution": args.resolution,
        "aspect_ratio": args.aspect_ratio,
        "width": args.width,
        "height": args.height,
        "num_frames": args.frames,
        "fps": args.fps,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "guidance_scale_2": args.guidance_scale_2,
        "flow_shift": args.flow_shift,
        "seed": args.seed,
        "image": args.image,
        "last_image": args.last_image,
        "resize": args.resize,
        "loras": requested_loras(args),
        "fast_mode": args.fast_mode,
        "accelerator": args.accelerator,
        "cfg_batch": args.cfg_batch,
    }
    spec = resolve_model(args.model)
    request = resolve_request(spec, args.prompt, **options)  # everything is checked offline, first
    from .devices import resolve_device
    from .video import check_output, quality_to_crf

    quality_to_crf(args.quality, "--quality")
    output = check_output(args.output or f"wanlora-{request.settings.seed}.mp4", "--output")
    parallel = check_parallel_args(args, spec, request.settings)
    if parallel is None:
        resolve_device(args.device)
    identified = identify_model(args.model)  # a Hub repo's own config may name another variant
    if identified != spec:
        options["seed"] = request.settings.seed
        spec, request = identified, resolve_request(identified, args.prompt, **options)
    from .lora.fetch import fetch_lora_files

    for lora in request.loras:  # download and verify before the (slow) model load
        fetch_lora_files(lora.ref)
    if parallel is not None and not launched_by_torchrun():
        from .launch import run_workers

        return run_workers(parallel.world_size, args.argv, quiet=not args.verbose)
    from .pipeline import WanLoraPipeline

    pipe = WanLoraPipeline.from_pretrained(
        spec,
        device=args.device,
        attention=args.attention,
        compile=args.compile,
        offload=args.offload,
        parallel=parallel,
    )
    video = pipe.run(request)
    if video is not None:  # None on every rank but 0 of a parallel run
        print(video.save(output, quality=args.quality))
    return None


def check_parallel_args(args: argparse.Namespace, spec: ModelSpec, settings: GenerationSettings) -> ParallelPlan | None:
    """The plan the parallel flags ask for (None: one process), checked before anything loads."""
    world = world_size()
    if args.gpus is not None:
        if args.gpus < 1:
            raise InvalidInput("--gpus", args.gpus, "1 or more")
        if launched_by_torchrun() and args.gpus != world:
            raise InvalidInput("--gpus", args.gpus, f"{world}, the process count torchrun started (or leave it out)")
        world = args.gpus
    if world == 1:
        for flag, value in (("--ulysses", args.ulysses), ("--ring", args.ring), ("--cfg-parallel", args.cfg_parallel)):
            if value:
                raise InvalidInput(flag, value, "used with --gpus 2 or more (or under torchrun)")
        return None
    if args.device:
        raise InvalidInput("--device", args.device, "left out with --gpus: each process takes its own device")
    import torch

    visible = torch.cuda.device_count()
    if visible and world > visible and not launched_by_torchrun():
        raise InvalidInput("--gpus", world, f"at most the {visible} GPUs visible here")
    plan = plan_from_args(args, spec, world)
    plan.check(spec.arch.num_attention_heads, world, spec.name, "cuda" if visible else "cpu")
    plan.check_tokens(spec.token_count(settings.width, settings.height, settings.num_frames), settings.size)
    plan.check_fast_mode(args.fast_mode)
    if args.cfg_batch and plan.cfg:
        raise InvalidInput("--cfg-batch", True, "left out with --cfg-parallel, which runs both passes at once")
    return plan


def plan_from_args(args: argparse.Namespace, spec: ModelSpec, world: int) -> ParallelPlan:
    """--ulysses / --ring / --cfg-parallel over `world` processes; what is left open is chosen as in auto."""
    plan = ParallelPlan.auto(world, spec.arch.num_attention_heads, args.cfg_parallel)
    degree = plan.context_degree
    for flag, value in (("--ulysses", args.ulysses), ("--ring", args.ring)):
        if value is not None and (value < 1 or degree % value):
            raise InvalidInput(flag, value, f"a divisor of {degree}, the processes that split each pass")
    if args.ulysses or args.ring:
        ulysses = args.ulysses or degree // args.ring
        plan = ParallelPlan(ulysses, args.ring or degree // ulysses, args.cfg_parallel)
    return plan


def cmd_tiny_model(args: argparse.Namespace) -> None:
    from .tiny import write_tiny_model

    target = Path(args.dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InvalidInput("DIR", args.dir, "a new or empty folder")
    print(write_tiny_model(target, kind=args.kind))


def describe_lora(ref: str, model: str | None) -> list[dict]:
    """What `lora inspect` shows: one entry per file (two for a Wan2.2 pair)."""
    from .lora.fetch import expert_of, fetch_lora_files
    from .lora.formats import read_lora
    from .lora.merge import fit_lora
    from .lora.refs import display_ref

    params = None
    if model:
        from .pipeline import meta_transformer

        params = dict(meta_transformer(resolve_model(model)).named_parameters())
    infos = []
    for role, fetched in fetch_lora_files(ref):
        lora = read_lora(fetched.path, label=display_ref(ref))
        info = {
            "source": fetched.source,
            "path": str(fetched.path),
            "layout": lora.layout,
            "tensors": lora.tensor_count,
            "parameters": len(lora.deltas),
            "ranks": lora.ranks,
            "alphas": lora.alphas,
            "delta_kinds": sorted({d.kind for d in lora.deltas.values()}),
            "targets": lora.module_kinds,
            "base_model": lora.base_model_hint(),
            "expert": role if role != "both" else expert_of(fetched.path),  # None: its name does not say
            "trigger_words": fetched.trigger_words,
        }
        if params is not None:
            fit = fit_lora(lora, params)
            blocks = {name.split(".")[1] for name in fit.deltas if name.startswith("blocks.")}
            linears = [
                n for n, p in params.items() if n.endswith(".weight") and p.dim() == 2 and n.startswith("blocks.")
            ]
            info["coverage"] = {
                "model": model,
                "parameters_changed": len(fit.deltas),
                "block_linears_changed": sum(1 for n in linears if n in fit.deltas),
                "block_linears_total": len(linears),
                "blocks_touched": len(blocks),
                "blocks_total": sum(1 for n in params if n.endswith("attn1.to_q.weight")),
                "skipped_image_parts": fit.skipped,
            }
        infos.append(info)
    return infos


def cmd_lora_inspect(args: argparse.Namespace) -> None:
    infos = describe_lora(args.ref, args.model)
    if args.json:
        print(json.dumps(infos[0] if len(infos) == 1 else infos, indent=2))
        return
    for number, info in enumerate(infos):
        if number:
            print()
        rows = [
            ("source", info["source"]),
            ("file", info["path"]),
            ("layout", info["layout"]),
            ("tensors", f"{info['tensors']} ({info['parameters']} parameters changed)"),
            ("ranks", ", ".join(map(str, info["ranks"])) or "-"),
            ("alpha", ", ".join(f"{a:g}" for a in info["alphas"]) or "-"),
            ("deltas", ", ".join(info["delta_kinds"])),
            ("targets", ", ".join(info["targets"])),
            ("made for", info["base_model"]),
            ("expert", f"the {info['expert']}-noise expert (Wan2.2 A14B)" if info["expert"] else "not said"),
            ("trigger words", ", ".join(info["trigger_words"]) or "none found"),
        ]
        if "coverage" in info:
            c = info["coverage"]
            rows.append(
                (
                    "coverage",
                    f"{c['block_linears_changed']}/{c['block_linears_total']} block linears in "
                    f"{c['blocks_touched']}/{c['blocks_total']} blocks of {c['model']}",
                )
            )
            if c["skipped_image_parts"]:
                rows.append(("skipped", f"{len(c['skipped_image_parts'])} image-branch parameters"))
        for key, value in rows:
            print(f"{key:>14}: {value}")


def cmd_lora_merge(args: argparse.Namespace) -> None:
    import torch

    from .lora.selection import parse_requests
    from .pipeline import WanLoraPipeline

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInput("--out", args.out, "a new or empty folder")
    loras = parse_requests(requested_loras(args))
    if not loras:
        raise InvalidInput("--lora", None, "at least one --lora, --lora-high or --lora-low to bake in")
    pipe = WanLoraPipeline.from_pretrained(args.model, device="cpu", dtype=getattr(torch, DTYPES[args.dtype]))
    pipe.set_loras(loras)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.diffusers_pipeline.save_pretrained(staging, safe_serialization=True)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(out)


def cmd_lora_fetch(args: argparse.Namespace) -> None:
    from .lora.fetch import fetch_lora_files

    files = fetch_lora_files(args.ref)
    for role, fetched in files:
        expert = "" if role == "both" else f" ({role}-noise expert)"
        print(f"source: {fetched.source}{expert}")
        print(f"size: {fetched.size / 2**20:.1f} MiB" + (f", sha256 {fetched.sha256}" if fetched.sha256 else ""))
        print(f"trigger words: {', '.join(fetched.trigger_words) or 'none found'}")
    print("\n".join(str(fetched.path) for _, fetched in files))


def cmd_cache(args: argparse.Namespace) -> None:
    import time

    from .lora.cache import LoraCache
    from .settings import cache_max_bytes

    cache = LoraCache()
    if args.cache_command == "clear":
        freed = cache.clear()
        print(f"cleared {cache.root} ({freed / 2**20:.1f} MiB freed)")
        return
    entries = cache.entries()
    total = sum(e.size for e in entries)
    print(f"{cache.root}: {len(entries)} LoRAs, {total / 2**20:.1f} MiB of {cache_max_bytes() / 2**30:g} GiB")
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        print(f"{e.size / 2**20:9.1f} MiB  {used}  {e.source}")


COMMANDS = {
    ("generate", None): cmd_generate,
    ("tiny-model", None): cmd_tiny_model,
    ("lora", "fetch"): cmd_lora_fetch,
    ("lora", "inspect"): cmd_lora_inspect,
    ("cache", "list"): cmd_cache,
    ("cache", "clear"): cmd_cache,
    ("lora", "merge"): cmd_lora_merge,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # what `--gpus` hands to each worker
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # diffusers and transformers speak up about experimental APIs and optional backends on
        # every load; they read these before configuring their own loggers
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")
        warnings.filterwarnings("ignore", category=UserWarning)  # libraries' deprecation chatter
        warnings.filterwarnings("ignore", category=FutureWarning)
    sub = getattr(args, "lora_command", None) or getattr(args, "cache_command", None)
    handler = COMMANDS[(args.command, sub)]
    speaks = process_rank() == 0  # the ranks of a parallel run fail alike: say it once
    try:
        return handler(args) or 0
    except WanLoraError as exc:
        if speaks:
            print(f"wanlora: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if speaks and not launched_by_gpus():  # under --gpus, the launcher says it
            print("wanlora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
