"""The `wanlora` command. Every user error prints one line, naming the flag that was typed, and exits 2.

torch, diffusers and the LoRA engine are imported inside the commands that use them, after
every input has been checked, so that --help and input errors answer at once; on a terminal,
a line on stderr says what the slow steps are doing while they run.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import re
import signal
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, NoReturn

from .. import __version__
from ..errors import InternalError, InvalidInput, WanLoraError
from ..logs import NOTICE, scrub
from ..logs import configure as configure_logging
from ..lora.selection import parse_requests
from ..models import CATALOGUE, TINY_KINDS, TINY_NAMES, ModelSpec, resolve_model
from ..options import MODEL, SAMPLING, SPEED, SWEEP_AXES, WHAT, GenerationOptions, Option, describe, option_names
from ..pairs import EVERY_EXPERT
from ..parallel import ParallelPlan, launched_by_gpus, launched_by_torchrun, process_rank, requested_plan
from ..resident import Prepared, ResidentModel, prepare
from ..runtime.attention import CHOICES as ATTENTION_CHOICES
from ..settings import (
    DEFAULT_MODEL,
    DEFAULT_QUALITY,
    OFFLOAD_MODES,
    QUALITY_RANGE,
)
from ..sweep import Axis
from ..weights import formats

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
LORA_FIELDS = {"lora": "--lora", "lora strength": "--lora", "loras": "--lora"}  # the library's names for them


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2, and a mistyped flag gets the
    nearest real one (`--lroa`: did you mean --lora?)."""

    argv: list[str] = []

    def parse_args(self, args=None, namespace=None):
        self.argv = list(sys.argv[1:] if args is None else args)  # the command typed, for `error`'s hints
        return super().parse_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        # argparse quotes the value it refused (`invalid int value: '...'`): it passes the scrubber too
        self.exit(2, f"{self.prog}: error: {scrub(message)}{self.nearest_flags(message)}\n")

    def nearest_flags(self, message: str) -> str:
        """`; did you mean --lora?` for each unknown flag in an `unrecognized arguments` message that is close
        to a flag of the command typed (argparse suggests only from Python 3.14)."""
        if not message.startswith(UNRECOGNIZED):
            return ""
        known = [flag for parser in command_chain(self, self.argv) for flag in parser._option_string_actions]
        hints = []
        for word in message.removeprefix(UNRECOGNIZED).split():
            typed = word.split("=", 1)[0]
            near = difflib.get_close_matches(typed, known, n=1, cutoff=0.6) if typed.startswith("--") else []
            hints += [f"{typed}: did you mean {near[0]}?"] if near else []
        return "".join(f"; {hint}" for hint in hints)


UNRECOGNIZED = "unrecognized arguments: "


def command_chain(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[argparse.ArgumentParser]:
    """`parser` and the subcommands' parsers `argv` goes through (`wanlora lora inspect`: three)."""
    chain = [parser]
    while True:
        # argparse keeps no public list of a parser's subcommands
        commands = next((a.choices for a in chain[-1]._actions if isinstance(a, argparse._SubParsersAction)), {})
        following = next((commands[word] for word in argv if word in commands), None)
        if following is None:
            return chain
        chain.append(following)


def say(text: str) -> None:
    """Tell a person at a terminal what the next slow step is; logged (shown with -v) either way."""
    logging.getLogger("wanlora.frontends.cli").info(text)
    if sys.stderr.isatty() and not logging.getLogger("wanlora").isEnabledFor(logging.INFO):
        print(f"wanlora: {text}...", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- LoRA arguments


def parse_lora_arg(text: str) -> tuple[str, float | tuple[float, ...]]:
    """`REF[:STRENGTH]`: the strength is the text after the last ':'.

    A comma-separated list of numbers is a strength schedule (`style.safetensors:1,0.5`).
    A bare scheme such as `civitai:12345` is a reference, not a strength, and so is a colon
    inside a link (`https://host:8443/x.safetensors`). Anything else after the last ':' must
    be a number: `style.safetensors:abc` is a typo, not a file.
    """
    ref, sep, tail = text.rpartition(":")
    if not sep or not ref or SCHEME.fullmatch(ref) or Path(text).exists():
        return text, 1.0
    try:
        values = tuple(float(v) for v in tail.split(","))
    except ValueError:
        if "://" in ref or "/" in tail or "\\" in tail:  # a port or a path: part of the reference
            return text, 1.0
        raise InvalidInput("--lora", text, f"REF:STRENGTH with a number after the last ':', not {tail!r}") from None
    return ref, values if len(values) > 1 else values[0]


def add_lora_options(group) -> None:
    group.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="REF[:S]",
        help="a LoRA and its strength S (default 1; S1,S2,... is a schedule over the steps), on every "
        "transformer; repeat to combine several. A Wan2.2 high/low pair (a repo or folder holding both files) "
        "puts each file on its expert. REF: " + REF_HELP,
    )
    for expert in ("high", "low"):
        group.add_argument(
            f"--lora-{expert}",
            action="append",
            default=[],
            metavar="REF[:S]",
            help=f"a LoRA on Wan2.2 A14B's {expert}-noise expert only; default none",
        )


def requested_loras(args: argparse.Namespace, spec: ModelSpec) -> list[tuple[str, float | tuple[float, ...], str]]:
    """--lora, --lora-high and --lora-low as (reference, strength, expert) triples."""
    aimed = [(EVERY_EXPERT, args.lora), ("high", args.lora_high), ("low", args.lora_low)]
    for expert, texts in aimed[1:]:
        if texts and spec.identified and expert not in spec.experts:
            raise InvalidInput(
                f"--lora-{expert}", texts[0], f"for Wan2.2 A14B's experts; {spec.name} has one transformer: use --lora"
            )
    return [(*parse_lora_arg(text), expert) for expert, texts in aimed for text in texts]


# ---------------------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    verbose = OneLineParser(add_help=False)  # -v before or after the command
    verbose.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log what happens, to stderr"
    )
    parser = OneLineParser(
        prog="wanlora", description="Wan2.1 and Wan2.2 video generation with LoRAs from anywhere.", parents=[verbose]
    )
    parser.add_argument("--version", action="version", version=f"wanlora {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    add_generate(commands, verbose)
    add_sweep(commands, verbose)
    add_batch(commands, verbose)
    add_tiny_model(commands, verbose)
    add_lora(commands, verbose)
    add_cache(commands, verbose)
    models = commands.add_parser("models", parents=[verbose], help="list the catalogue: every variant and its defaults")
    models.add_argument(
        "--memory",
        action="store_true",
        help="instead, the memory plan: what --offload auto picks per variant, GPU size and weight dtype, with "
        "the peak GPU and host memory; default off",
    )
    models.add_argument(
        "--json", action="store_true", help="with --memory: every plan as JSON, stage by stage; default off"
    )
    file_formats = [entry.name for entry in formats.ENTRIES if entry.plans]
    models.add_argument(
        "--format",
        choices=file_formats,
        help=f"with --memory: the plans of a file format's types instead ({', '.join(file_formats)}: its "
        "files' types, on smaller cards too); default none",
    )
    return parser


def add_generate(commands, verbose: OneLineParser) -> None:
    gen = commands.add_parser(
        "generate",
        parents=[verbose],
        help="make an MP4 from a prompt",
        description="Make an MP4 from a prompt, with any LoRAs.",
    )
    add_generation_options(gen)
    gpus = gen.add_argument_group("several GPUs")
    gpus.add_argument(
        "--gpus",
        type=int,
        metavar="N",
        help="split each video across N processes, one per GPU (N CPU processes without CUDA); "
        "default 1, or torchrun's process count",
    )
    gpus.add_argument("--ulysses", type=int, metavar="U", help="Ulysses degree; default the most the heads allow")
    gpus.add_argument("--ring", type=int, metavar="R", help="ring-attention degree; default what Ulysses leaves")
    gpus.add_argument(
        "--cfg-parallel",
        action="store_true",
        help="run the two guidance passes on two halves of the processes; default off",
    )
    add_output_options(gen, "the MP4 to write; default wanlora-SEED.mp4")


def add_sweep(commands, verbose: OneLineParser) -> None:
    sweep = commands.add_parser(
        "sweep",
        parents=[verbose],
        help="one grid MP4 of the same request over LoRA strengths, seeds or prompts",
        description="One labelled grid MP4: the same request, seed and noise over one or two axes "
        "(a LoRA's strengths, seeds, prompts); each cell is an exact LoRA swap.",
    )
    add_generation_options(sweep)
    axes = sweep.add_argument_group("axes (one or two)")
    axes.add_argument("--strengths", metavar="S,S,...", help="the first --lora's strengths, e.g. 0,0.5,1; default none")
    axes.add_argument("--strengths-2", metavar="S,S,...", help="the second --lora's strengths; default none")
    for name, option in SWEEP_AXES.items():  # an option's values as an axis
        if option == "prompt":
            axes.add_argument(f"--{name}", metavar="FILE", help="a text file, one prompt a line; default none")
        else:
            flag = describe(option).flag
            help = f"values of {flag}, e.g. 1,2,3; default none (one {flag} for all)"
            axes.add_argument(f"--{name.replace('_', '-')}", metavar="N,N,...", help=help)
    axes.add_argument("--max-width", type=int, default=1920, metavar="PX", help="the grid's widest; default 1920")
    axes.add_argument("--keep-cells", metavar="DIR", help="also save each cell as its own MP4 there; default none")
    add_output_options(sweep, "the grid MP4 to write; default wanlora-sweep-SEED.mp4")


def add_generation_options(gen: argparse.ArgumentParser) -> None:
    """What generate and sweep share: the request (every GenerationOptions field with a flag), the model and
    how it runs."""
    gen.add_argument("prompt", help=describe("prompt").help)
    model = gen.add_argument_group(MODEL)
    model.add_argument("--model", default=DEFAULT_MODEL, help=f"default {DEFAULT_MODEL}: {MODEL_HELP}")
    model.add_argument(
        "--transformer",
        metavar="FILE",
        help="the transformer from one .safetensors file instead (ComfyUI's or Kijai's: full precision, or "
        f"{', '.join(formats.QUANTIZE_CHOICES[1:])}, scaled or not), "
        "a folder holding one (or a Wan2.2 high/low pair), or OWNER/REPO/FILE.safetensors; the rest comes "
        "from --model; default none",
    )
    model.add_argument(
        "--transformer-2",
        metavar="FILE",
        help="Wan2.2 A14B: the low-noise expert's file, --transformer the high one; default none",
    )
    add_lora_options(model)
    groups = {MODEL: model, WHAT: gen.add_argument_group(WHAT), SAMPLING: gen.add_argument_group(SAMPLING)}
    groups[SPEED] = add_load_options(gen)
    for f in fields(GenerationOptions):
        meta: Option = f.metadata["option"]
        if meta.flag is None:
            continue
        group = groups[meta.group]
        if "bool" in str(f.type):
            group.add_argument(meta.flag, dest=f.name, action="store_true", help=meta.help)
            continue
        kind = int if "int" in str(f.type) else float if "float" in str(f.type) else str
        choices = list(meta.choices) if meta.choices else None
        group.add_argument(
            meta.flag, dest=f.name, type=kind, default=f.default, choices=choices, metavar=meta.metavar, help=meta.help
        )


def add_load_options(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """How a model loads and runs: what generate, sweep and batch share."""
    speed = parser.add_argument_group("device, speed and memory")
    speed.add_argument("--device", help="cpu, cuda or cuda:N; default cuda when there is a GPU")
    speed.add_argument(
        "--attention",
        default="auto",
        choices=ATTENTION_CHOICES,
        help="attention kernel; default auto (xformers on CUDA when installed, else SDPA)",
    )
    speed.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks (GPU); default off")
    speed.add_argument(
        "--quantize",
        choices=formats.QUANTIZE_CHOICES,
        default="none",
        help=formats.quantize_help(),
    )
    speed.add_argument(
        "--lora-mode",
        choices=formats.lora_modes(),
        help="how LoRAs apply to a .gguf transformer's weights: unfused (the default: beside the matmul, exact), "
        "requantize (merged into the file's own types) or promote (the layers LoRAs touch in bf16); others merge",
    )
    speed.add_argument(
        "--offload",
        choices=OFFLOAD_MODES,
        default="auto",
        help="save GPU memory: encoder (the text encoder on the GPU only to encode), experts (one Wan2.2 "
        "A14B expert on the GPU at a time), model (components on demand) or group (blocks streamed); "
        "default auto: the fastest that fits this GPU (`wanlora models --memory`)",
    )
    return speed


def add_batch(commands, verbose: OneLineParser) -> None:
    batch = commands.add_parser(
        "batch",
        parents=[verbose],
        help="run a JSONL file of requests: each model loads once, each LoRA set merges once; resumable",
        description="Run every request of a JSONL file (one a line, in the Python API's or the predictor's "
        "fields, plus output and quality) into a folder, grouped by model and LoRA set. A manifest there "
        "records each job; a rerun skips the jobs already done. Relative paths in a line are the jobs "
        "file's folder's. Exit status: 0 when every job is done, 3 when some failed (the summary counts "
        "them; the manifest says why), 2 for an input error before any job ran, 1 for a bug.",
    )
    batch.add_argument("jobs", metavar="JOBS.jsonl", help="the requests, one JSON object a line")
    batch.add_argument("--out", required=True, metavar="DIR", help="the folder for the MP4s and manifest.jsonl")
    add_load_options(batch)
    ray = batch.add_argument_group("Ray (pip install 'wanlora[ray]')")
    ray.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run on a Ray cluster, one actor per GPU: its address (e.g. ray://head:10001), or none for a "
        "local cluster over this machine's GPUs; default off (one process)",
    )
    ray.add_argument(
        "--actors",
        type=int,
        metavar="N",
        help="the actors to start; default one per GPU in the cluster (without GPUs, N CPU actors)",
    )
    ray.add_argument(
        "--collect",
        action="store_true",
        help="send each MP4 back to this machine as bytes; default off: every node writes to --out, "
        "which they must all share",
    )


def add_output_options(gen: argparse.ArgumentParser, what: str) -> None:
    out = gen.add_argument_group("output")
    out.add_argument("-o", "--output", metavar="OUT.mp4", help=what)
    lowest, highest = QUALITY_RANGE
    out.add_argument(
        "--quality",
        type=int,
        default=DEFAULT_QUALITY,
        metavar="Q",
        help=f"MP4 quality {lowest} to {highest}, higher is better; default {DEFAULT_QUALITY} (H.264 CRF 18)",
    )
    out.add_argument("--overwrite", action="store_true", help="replace the output file if it exists; default refuse")


def add_tiny_model(commands, verbose: OneLineParser) -> None:
    tiny = commands.add_parser("tiny-model", parents=[verbose], help="write a tiny random Wan model (diffusers layout)")
    tiny.add_argument("dir", metavar="DIR", help="a new or empty folder")
    tiny.add_argument(
        "--kind",
        choices=list(TINY_KINDS),
        default="t2v",
        help="the variant it stands in for: t2v (Wan2.1, the default), i2v (Wan2.1, with a tiny CLIP), "
        "t2v-a14b and i2v-a14b (Wan2.2, two experts), ti2v-5b (Wan2.2's VAE)",
    )
    tiny.add_argument("--i2v", action="store_const", const="i2v", dest="kind", help="the same as --kind i2v")


def add_lora(commands, verbose: OneLineParser) -> None:
    lora = commands.add_parser("lora", parents=[verbose], help="inspect LoRA files or bake them into a model")
    lora_commands = lora.add_subparsers(dest="lora_command", required=True, parser_class=OneLineParser)
    fetch = lora_commands.add_parser("fetch", parents=[verbose], help="download and verify a LoRA; print its path")
    fetch.add_argument("ref", metavar="REF", help=REF_HELP)
    inspect = lora_commands.add_parser(
        "inspect", parents=[verbose], help="show a LoRA's layout, ranks, targets, trigger words and fit"
    )
    inspect.add_argument("ref", metavar="REF", help=REF_HELP)
    inspect.add_argument(
        "--model", help="also say whether it fits this base model, and how much of it it changes: " + MODEL_HELP
    )
    inspect.add_argument("--json", action="store_true", help="print every detail as JSON")
    merge = lora_commands.add_parser("merge", parents=[verbose], help="write a diffusers-layout model with LoRAs in it")
    merge.add_argument("--model", required=True, help=MODEL_HELP)
    add_lora_options(merge)
    merge.add_argument("--out", dest="folder", metavar="DIR", required=True, help="a new or empty folder")
    merge.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="weights dtype; default bf16")


def add_cache(commands, verbose: OneLineParser) -> None:
    cache = commands.add_parser("cache", parents=[verbose], help="the LoRA download cache (WANLORA_CACHE)")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True, parser_class=OneLineParser)
    cache_commands.add_parser("list", parents=[verbose], help="show cached LoRAs, most recently used first")
    cache_commands.add_parser("clear", parents=[verbose], help="delete every cached LoRA and unfinished download")


def flag_names(parser: argparse.ArgumentParser, argv: Sequence[str]) -> dict[str, str]:
    """The library's field name -> the flag a person typed for it, for the command in `argv`."""
    names = dict(LORA_FIELDS)
    for current in command_chain(parser, argv):
        for action in current._actions:  # argparse keeps no public list of a parser's options
            if action.option_strings:
                names[action.dest] = max(action.option_strings, key=len)
            elif not isinstance(action, argparse._SubParsersAction):
                names[action.dest] = action.metavar if isinstance(action.metavar, str) else action.dest.upper()
    return names


# ---------------------------------------------------------------------------- the commands


def generation_options(args: argparse.Namespace, spec: ModelSpec) -> GenerationOptions:
    """The request, as the flags give it."""
    given = {name: getattr(args, name) for name in option_names() if name != "loras"}
    return GenerationOptions(**given, loras=requested_loras(args, spec))


def checked(args: argparse.Namespace, default_output: str, sweep: tuple[Axis, ...] | None = None):
    """The request prepared and the output path: everything checked offline, first."""
    options = generation_options(args, resolve_model(args.model))
    prepared = prepare(args.model, options, sweep)
    from ..lora.fetch import check_reference
    from ..video import check_output, quality_to_crf

    for lora in prepared.request.loras or ():
        check_reference(lora.ref)  # its form, and that a local file exists
    quality_to_crf(args.quality, "quality")
    output = check_output(args.output or default_output.format(seed=prepared.request.settings.seed), "--output")
    if not args.overwrite and (output.exists() or output.is_symlink()):  # a run with the same seed, another video
        raise InvalidInput("--output", str(output), "a file that is not there yet (--overwrite replaces it)")
    return prepared, output


def identified_and_fetched(prepared: Prepared) -> Prepared:
    """The request for the model as its own config names it (a Hub repo may be another variant), and every
    LoRA fetched, before the slow model load."""
    from ..lora.fetch import fetch_lora_files

    prepared = prepared.identify()
    for lora in prepared.request.loras or ():
        say(f"fetching {lora.label}")
        fetch_lora_files(lora.ref)
    return prepared


def resident_model(args: argparse.Namespace, parallel: ParallelPlan | None = None) -> ResidentModel:
    quiet_library_bars()
    transformer = args.transformer if args.transformer_2 is None else (args.transformer, args.transformer_2)
    return ResidentModel(**load_options(args), parallel=parallel, transformer=transformer)


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    """from_pretrained's keyword arguments, as the flags give them."""
    return {
        "device": args.device,
        "attention": args.attention,
        "compile": args.compile,
        "offload": args.offload,
        "quantize": args.quantize,
        "lora_mode": args.lora_mode,
    }


def cmd_generate(args: argparse.Namespace) -> int | None:
    prepared, output = checked(args, "wanlora-{seed}.mp4")
    say("importing torch and diffusers")
    from ..runtime.devices import resolve_device

    request = prepared.request
    parallel = requested_plan(args.gpus, args.ulysses, args.ring, args.cfg_parallel, args.device,
                              request.spec.arch.num_attention_heads, request.spec.name)  # fmt: skip
    if parallel is None:
        resolve_device(args.device)
    else:
        parallel.check_fast_mode(request.fast_mode)
        if request.cfg_batch and parallel.cfg:
            raise InvalidInput("cfg_batch", True, "left out with --cfg-parallel, which runs both passes at once")
    prepared = identified_and_fetched(prepared)
    tell_seed(prepared.request.settings.seed, "--seed {seed} makes this video again")
    if parallel is not None and not launched_by_torchrun():
        from ..parallel.launch import run_workers

        return run_workers(parallel.world_size, args.argv, quiet=not args.verbose)
    say(f"loading {prepared.request.spec.name} ({prepared.model})")
    video = resident_model(args, parallel).run(prepared)
    if video is not None:  # None on every rank but 0 of a parallel run
        say(f"encoding {output}")
        print(video.save(output, quality=args.quality, overwrite=args.overwrite))
    return None


def cmd_sweep(args: argparse.Namespace) -> None:
    from ..sweep import check_max_width, sweep_axes

    check_max_width(args.max_width, "--max-width")  # before the model loads
    spec = resolve_model(args.model)
    loras = parse_requests(requested_loras(args, spec))
    values = {"strengths": numbers(args.strengths, "strengths", float)}
    values["strengths_2"] = numbers(args.strengths_2, "strengths_2", float)
    for name, option in SWEEP_AXES.items():
        given = getattr(args, name)
        values[name] = prompt_lines(given) if option == "prompt" else numbers(given, name, int)
    flags = {name: f"--{name.replace('_', '-')}" for name in values}  # the axes' own flags
    axes = sweep_axes(loras, **values, names=flags)
    keep = check_new_folder(Path(args.keep_cells), "--keep-cells") if args.keep_cells else None
    prepared, output = checked(args, "wanlora-sweep-{seed}.mp4", tuple(axes))
    prepared = replace(prepared, max_width=args.max_width)
    say("importing torch and diffusers")
    from ..runtime.devices import resolve_device

    resolve_device(args.device)
    prepared = identified_and_fetched(prepared)
    if args.seeds is None:
        tell_seed(prepared.request.settings.seed, "every cell's; --seed {seed} makes this grid again")
    say(f"loading {prepared.request.spec.name} ({prepared.model})")
    result = resident_model(args).sweep(prepared)
    assert result is not None  # one process: it is rank 0
    say(f"encoding {output}")
    grid = result.grid.save(output, quality=args.quality, overwrite=args.overwrite)  # first: the cells are extras
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        for cell in result.cells:
            cell.video.save(keep / f"cell-{cell.row}-{cell.column}.mp4", quality=args.quality)
    print(grid)


def check_new_folder(folder: Path, flag: str) -> Path:
    """`folder`, new or empty, and where it can be made: refused before any work, not after it."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise InvalidInput(flag, str(folder), "a new or empty folder")
    nearest = next(path for path in (folder.absolute(), *folder.absolute().parents) if path.exists())
    try:  # tried, not judged by its permission bits: a read-only mount, a folder only root may write
        tempfile.TemporaryDirectory(dir=nearest, prefix=".wanlora-check-").cleanup()
    except OSError:
        raise InvalidInput(
            flag, str(folder), f"a folder that can be made and written ({nearest} is not a writable folder)"
        ) from None
    return folder


def tell_seed(seed: int, again: str) -> None:
    """Say the seed without -v (once: a parallel run's workers leave it to the process that launched them)."""
    if process_rank() == 0 and not launched_by_gpus():
        logging.getLogger("wanlora.frontends.cli").log(NOTICE, "seed %d (%s)", seed, again.format(seed=seed))


def numbers(text: str | None, flag: str, kind: type[float] | type[int]) -> list | None:
    """A comma-separated list of numbers from a flag, or None when the flag was not given."""
    if text is None:
        return None
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        example = "1,2,3" if kind is int else "0,0.5,1"
        raise InvalidInput(flag, text, f"comma-separated numbers, e.g. {example}") from None


def prompt_lines(path: str | None) -> list[str] | None:
    """The prompts of a --prompts file, one a line (blank lines skipped), or None."""
    if path is None:
        return None
    try:
        return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput("--prompts", path, f"a readable UTF-8 text file ({exc})") from None


def cmd_batch(args: argparse.Namespace) -> int:
    from .batch import read_jobs, run_batch

    jobs = read_jobs(args.jobs)  # every line checked before any work
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InvalidInput("--out", str(out), "a folder (new, or one an earlier run of this batch made)")
    if args.actors is not None and args.ray is None:
        raise InvalidInput("--actors", args.actors, "only with --ray")
    if args.collect and args.ray is None:
        raise InvalidInput("--collect", True, "only with --ray")
    quiet_library_bars()
    if args.ray is not None:
        from .batch_ray import run_batch_on_ray

        summary = run_batch_on_ray(
            jobs, out, load_options(args), address=args.ray, actors=args.actors, collect=args.collect
        )
    else:
        summary = run_batch(jobs, out, load_options(args))
    print(summary.describe(out / "manifest.jsonl"))
    return summary.exit_status


def quiet_library_bars() -> None:
    """diffusers' and transformers' own bars (components, weights, shards): the CLI shows its own progress.

    Downloads keep theirs: a model's tens of GB from the Hub take minutes.
    """
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()  # which turns the Hub's off too
    enable_progress_bars()


def cmd_tiny_model(args: argparse.Namespace) -> None:
    target = Path(args.dir)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InvalidInput("dir", args.dir, "a new or empty folder")
    say("importing torch and diffusers")
    quiet_library_bars()
    from ..tiny import write_tiny_model

    print(write_tiny_model(target, kind=args.kind))


def cmd_lora_inspect(args: argparse.Namespace) -> None:
    from ..lora.inspect import coverage_line, inspect_lora

    transformer = spec = None
    if args.model:
        say("importing torch and diffusers")
        from ..pipeline import meta_transformer

        spec = resolve_model(args.model)
        transformer = meta_transformer(spec)
    reports = inspect_lora(args.ref, transformer, args.model or "the model", spec=spec)
    if args.json:
        dicts = [report.as_dict() for report in reports]
        print(json.dumps(dicts[0] if len(dicts) == 1 else dicts, indent=2))
        return
    for number, report in enumerate(reports):
        if number:
            print()
        rows = [
            ("source", report.source),
            ("file", report.path),
            ("layout", report.layout),
            ("tensors", f"{report.tensors} ({report.parameters} parameters changed)"),
            ("ranks", ", ".join(map(str, report.ranks)) or "-"),
            ("alpha", ", ".join(f"{a:g}" for a in report.alphas) or "-"),
            ("deltas", ", ".join(report.delta_kinds)),
            ("targets", ", ".join(report.targets)),
            (
                "made for",
                report.base_model
                + (f"; {report.base_model_said_by} says {m}" if (m := report.metadata_base_model) else ""),
            ),
            (
                "expert",
                (f"the {report.expert}-noise expert (Wan2.2 A14B): " if report.expert else "both: ")
                + report.expert_reason,
            ),
            ("trigger words", ", ".join(report.trigger_words) or "none found"),
        ]
        c = report.coverage
        if c is not None and not c.fits:
            count = len(c.missing) + len(c.misfit)
            rows.append((args.model, f"{c.verdict} (--json lists the {count} parameter{'s' * (count != 1)})"))
        elif c is not None:
            rows.append(("coverage", coverage_line(c)))
            if c.skipped_image_parts:
                rows.append(("skipped", f"{len(c.skipped_image_parts)} image-branch parameters"))
        for key, value in rows:
            print(f"{key:>14}: {value}")


def cmd_lora_merge(args: argparse.Namespace) -> None:
    from ..lora.selection import parse_requests

    spec = resolve_model(args.model)
    loras = parse_requests(requested_loras(args, spec))
    if not loras:
        raise InvalidInput("--lora", None, "at least one --lora, --lora-high or --lora-low to bake in")
    out = Path(args.folder)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInput("folder", args.folder, "a new or empty folder")
    say("importing torch and diffusers")
    quiet_library_bars()
    import torch

    from ..pipeline import WanLoraPipeline

    say(f"loading {spec.name} ({spec.source})")
    pipe = WanLoraPipeline.from_pretrained(args.model, device="cpu", dtype=getattr(torch, DTYPES[args.dtype]))
    pipe.set_loras(loras)
    say(f"writing {out}")
    print(pipe.save_merged(out))


def cmd_lora_fetch(args: argparse.Namespace) -> None:
    from ..lora.fetch import fetch_lora_files

    files = fetch_lora_files(args.ref)
    for role, fetched in files:
        expert = "" if role == EVERY_EXPERT else f" ({role}-noise expert)"
        print(f"source: {fetched.source}{expert}")
        print(f"size: {fetched.size / 2**20:.1f} MiB" + (f", sha256 {fetched.sha256}" if fetched.sha256 else ""))
        print(f"trigger words: {', '.join(fetched.trigger_words) or 'none found'}")
    print("\n".join(str(fetched.path) for _, fetched in files))


def cmd_cache(args: argparse.Namespace) -> None:
    import time

    from ..lora.cache import LoraCache
    from ..settings import cache_max_bytes

    cache = LoraCache()
    if args.cache_command == "clear":
        freed, busy = cache.clear()
        kept = f"; {busy} in use by another process, kept" if busy else ""
        print(f"cleared {cache.root} ({freed / 2**20:.1f} MiB freed{kept})")
        return
    entries = cache.entries()
    total = sum(e.size for e in entries)
    print(f"{cache.root}: {len(entries)} LoRAs, {total / 2**20:.1f} MiB of {cache_max_bytes() / 2**30:g} GiB")
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        print(f"{e.size / 2**20:9.1f} MiB  {used}  {e.source}")


def cmd_models(args: argparse.Namespace) -> None:
    if args.memory:
        from ..runtime.memory import format_plans, format_table, memory_json, memory_table

        if args.format is not None:
            plans = [plan.as_dict() for plan in format_plans(args.format)]
            print(json.dumps(plans, indent=1) if args.json else format_table(args.format))
            return
        print(json.dumps(memory_json(), indent=1) if args.json else memory_table())
        return
    if args.json or args.format:
        raise InvalidInput("json" if args.json else "format", args.json or args.format, "it goes with --memory")
    from ..models import catalogue_markdown

    print(catalogue_markdown(), end="")


COMMANDS = {
    ("generate", None): cmd_generate,
    ("sweep", None): cmd_sweep,
    ("batch", None): cmd_batch,
    ("tiny-model", None): cmd_tiny_model,
    ("lora", "fetch"): cmd_lora_fetch,
    ("lora", "inspect"): cmd_lora_inspect,
    ("cache", "list"): cmd_cache,
    ("cache", "clear"): cmd_cache,
    ("lora", "merge"): cmd_lora_merge,
    ("models", None): cmd_models,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # what `--gpus` hands to each worker
    args.verbose = getattr(args, "verbose", False)
    configure_logging(verbose=args.verbose)
    if not args.verbose and process_rank() != 0:  # a parallel run's notices are rank 0's to say, once
        logging.getLogger("wanlora").setLevel(logging.WARNING)
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
    except InvalidInput as exc:
        if speaks:
            print(f"wanlora: error: {exc.renamed(flag_names(parser, argv))}", file=sys.stderr)
        return 2
    except WanLoraError as exc:
        if speaks:
            print(f"wanlora: error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, InternalError) else 2
    except BrokenPipeError:
        # the reader stopped reading (`wanlora models --json | head`): not a failure to report; stdout
        # goes nowhere from here, so that the interpreter's last flush does not fail a second time
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a process ended by SIGPIPE
    except Exception as exc:  # a bug, reported in one scrubbed line like any other failure
        if speaks:
            print(f"wanlora: error: {InternalError.of(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        if speaks and not launched_by_gpus():  # under --gpus, the launcher says it
            told = f": {exc}" if str(exc) else ""  # a batch says how far it got, and how to go on
            print(f"wanlora: interrupted{told}", file=sys.stderr)
        return 128 + getattr(exc, "signum", signal.SIGINT)  # 130 for Ctrl-C, 143 for a batch's SIGTERM


if __name__ == "__main__":
    sys.exit(main())
