"""The memory plan: for each stage of a generation, what is on the GPU, its peak, and what waits on the host.

A generation has three stages: `encode` (the prompt through UMT5; for image-to-video also the
image through CLIP and the conditioning frames through the VAE), `denoise` (the transformer,
or Wan2.2 A14B's two experts in turn) and `decode` (the VAE). Each stage's peak is the
weights then on the GPU plus the stage's activations. `offload="auto"` takes the fastest mode
whose every stage fits (`plan_memory`), and the log says which and why:

- "none": everything resident;
- "encoder": everything resident but the 11.4 GB UMT5 text encoder, which streams to the GPU
  one block at a time from pinned host memory to encode, and is never copied back;
- "experts" (Wan2.2 A14B): one expert resident, the other in pinned host memory, switched at
  the expert boundary; the text encoder streams as in "encoder";
- "model": each component on the GPU only while it runs (diffusers' model offload);
- "group": the transformer's blocks and the text encoder's layers streamed from pinned host
  memory (diffusers' group offloading), the VAE resident.

Within a mode the VAE decodes untiled, as the reference does, wherever that fits; only where it
does not are its decode (and encode) tiled, and the plan says so.

Weights are exact: each component built on the `meta` device at its published shape, its
parameters counted at their stored size (bf16, or the weight format's block linears as the format
builds them, scales included: wanlora.weights.formats; the VAE and CLIP in fp32). Activations are
formulas in the request's size, whose constants were measured by tracing every stage on `meta`
with a dispatch mode that counts live bytes and a flash-like attention (tests/test_memory_plan.py
traces them again for every entry, and holds each stated peak at or above its trace). The budget is
90% of the card's memory: the rest is the CUDA context and the caching allocator's slack.

Host memory: pinned buffers are plain allocations registered with CUDA (wanlora.weights.host_memory's
`HostArena`), so they cost what they hold; PyTorch's caching host allocator would round each up
to a power of two (a 28.6 GB expert to 34.4 GB). Pageable memory is what "model" offload moves
weights back to. The LoRA merges' pristine W0 is read from the memory-mapped checkpoint where
it gives the loaded bits back (wanlora.weights.checkpoint), and is not counted here.

`wanlora models --memory` prints the plan for every variant, GPU size and weight format (the
table in docs/memory.md); `--json` gives every stage.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..errors import InvalidInput
from ..logs import NOTICE
from ..models import CATALOGUE, CLIP_VIT_H, UMT5_XXL, WAN21_VAE, WAN22_VAE, Architecture, ModelSpec
from ..settings import OFFLOAD_MODES
from ..weights import formats

logger = logging.getLogger(__name__)

MODES = ("none", "encoder", "experts", "model", "group")  # fastest first
# (mode, VAE tiled) in the order "auto" tries them. Streaming the text encoder costs about half a second a
# generation; tiling changes the decode's computation (blended 256 px tiles) and costs time too, so the
# text encoder streams before the VAE tiles; the experts' switch and the offloads cost more than either.
CANDIDATES = (
    ("none", False),
    ("encoder", False),
    ("none", True),
    ("encoder", True),
    ("experts", False),
    ("experts", True),
    ("model", False),
    ("model", True),
    ("group", False),
    ("group", True),
)
GPU_SIZES_GB = (24, 32, 48, 80, 141)  # GiB, as cards are sold: 4090, 5090, L40S/A6000, A100/H100, H200
WEIGHT_DTYPES = formats.PLANNED  # full precision, and every format a model can be converted to
USABLE = 0.9  # of the card's memory: the CUDA context (~0.5 GB) and the caching allocator's slack
STAGES = ("encode", "denoise", "decode")
COMPONENTS = ("text_encoder", "image_encoder", "transformer", "transformer_2", "vae")  # diffusers' offload order

# Activation constants, measured by tracing each stage on `meta` (tests/test_memory_plan.py re-traces).
HELD_BYTES = 64 * 2**20  # what a stage keeps from the others: embeddings, latents, the step's outputs
TEXT_ENCODE_BYTES = 150_000_000  # UMT5-XXL over 512 tokens: traced 0.10 GB
IMAGE_ENCODE_BYTES = 60_000_000  # CLIP ViT-H/14 per 224x224 image (first-last-frame models take two): traced 0.056
# The transformer, per token and batch entry: its FFN and attention temporaries at their peak (bf16),
# what the weight format's matmuls keep beside (its `activation_bytes_per_token`), and a timestep per
# token (TI2V-5B) as fp32 modulation.
PER_TOKEN_DIM, PER_TOKEN_FFN, PER_TOKEN_TIMESTEP_DIM = 14, 3.1, 38
# The VAEs, by spatial compression (8: Wan2.1's, 16: Wan2.2's), per output pixel of one frame:
# the decoder's working set (it runs a latent frame at a time), the encoder's for one frame and for video.
VAE_DECODE_PER_PIXEL = {8: 19_300, 16: 21_400}
VAE_ENCODE_PER_PIXEL = {8: (3_900, 14_200), 16: (2_000, 7_800)}
VAE_TILE, VAE_TILE_STRIDE = 256, 192  # diffusers' AutoencoderKLWan tiles, in pixels


# ---------------------------------------------------------------------------- component sizes


@dataclass(frozen=True)
class Sizes:
    """The bytes of each component's weights as loaded, and of what streaming keeps on the GPU at once."""

    weights: dict[str, int]
    text_window: int  # the text encoder by blocks ("encoder", "experts"): its embedding and norm, and one block
    text_leaf_window: int  # by layers ("group"): the two largest (one runs, the next is fetched)
    transformer_window: int  # by blocks ("group"): all outside the blocks, and two blocks


def tensor_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def blocks_of(module: torch.nn.Module) -> torch.nn.ModuleList:
    """The repeated blocks of a transformer or text encoder: its largest list of modules."""
    lists = [child for child in module.modules() if isinstance(child, torch.nn.ModuleList) and len(child) > 1]
    if not lists:
        raise ValueError(f"{type(module).__name__} has no repeated blocks")
    return max(lists, key=lambda blocks: sum(p.numel() for p in blocks.parameters()))


def blocks_of_one(transformer: torch.nn.Module) -> torch.nn.Module:
    """The only block of a one-block transformer."""
    (block,) = blocks_of_list(transformer)
    return block


def blocks_of_list(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    return list(transformer.get_submodule("blocks").children())


def leaf_bytes(module: torch.nn.Module) -> list[int]:
    """The bytes of each leaf module's own tensors, a tensor shared by two (a tied embedding) counted once."""
    seen: set[int] = set()
    sizes = []
    for leaf in (m for m in module.modules() if not list(m.children())):
        tensors = [t for t in (*leaf.parameters(), *leaf.buffers()) if id(t) not in seen]
        seen.update(id(t) for t in tensors)
        sizes.append(sum(t.numel() * t.element_size() for t in tensors))
    return sorted(sizes, reverse=True)


def measure(components: dict[str, torch.nn.Module]) -> Sizes:
    """The sizes of loaded (or `meta`) components: "text_encoder", "transformer", ... by name."""
    text, transformer = components["text_encoder"], components["transformer"]
    return Sizes(
        weights={name: tensor_bytes(module) for name, module in components.items()},
        text_window=streaming_window(text, 1),
        text_leaf_window=sum(leaf_bytes(text)[:2]),
        transformer_window=streaming_window(transformer, 2),
    )


def streaming_window(module: torch.nn.Module, blocks: int) -> int:
    """What streaming `module` by blocks keeps on the GPU at once: everything outside its blocks, and `blocks`."""
    sizes = [tensor_bytes(block) for block in blocks_of(module)]
    return tensor_bytes(module) - sum(sizes) + blocks * max(sizes)


@functools.cache
def _meta_sizes(component: str, arch: Architecture | None = None, vae_scale: int = 8, weights: str = "bf16") -> Sizes:
    """One component at its published shape, measured on `meta` once (the text encoder with a stand-in
    transformer, and the other way round: `measure` wants both)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    from ..weights.dense import cast_keeping_fp32

    with torch.device("meta"):
        if component == "transformer":  # one block, the rest counted from it: every block has the same shapes
            arch = arch or CATALOGUE["t2v-1.3b"].arch
            module: torch.nn.Module = WanTransformer3DModel(**replace(arch, num_layers=1).transformer_config())
            cast_keeping_fp32(module, torch.bfloat16)
            if weights != formats.DENSE:
                formats.for_plan(weights).build_for_plan(module, weights)
        elif component == "text_encoder":
            module = UMT5EncoderModel(UMT5Config(**UMT5_XXL)).to(torch.bfloat16)
        elif component == "image_encoder":
            module = CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_H))
        else:
            module = AutoencoderKLWan(**(WAN22_VAE if vae_scale == 16 else WAN21_VAE))
    size = tensor_bytes(module)
    if component == "transformer":
        assert arch is not None
        block = tensor_bytes(blocks_of_one(module))
        return Sizes({component: size + (arch.num_layers - 1) * block}, 0, 0, size + block)
    if component == "text_encoder":
        return Sizes({component: size}, streaming_window(module, 1), sum(leaf_bytes(module)[:2]), 0)
    return Sizes({component: size}, 0, 0, 0)


def catalogue_sizes(spec: ModelSpec, weights: str) -> Sizes:
    """The sizes of `spec`'s components at their published shapes (each built on `meta` once, then remembered)."""
    text, transformer = _meta_sizes("text_encoder"), _meta_sizes("transformer", spec.arch, weights=weights)
    sizes = {**text.weights, "vae": _meta_sizes("vae", vae_scale=spec.vae_scale).weights["vae"]}
    if spec.arch.image_dim:
        sizes["image_encoder"] = _meta_sizes("image_encoder").weights["image_encoder"]
    for name in ("transformer", "transformer_2")[: len(spec.experts)]:
        sizes[name] = transformer.weights["transformer"]
    return Sizes(sizes, text.text_window, text.text_leaf_window, transformer.transformer_window)


def transformer_bytes(arch: Architecture, weights: str = formats.DENSE) -> int:
    """One transformer's weights as loaded on a GPU: bf16, or its block linears in the format `weights` (exact)."""
    return _meta_sizes("transformer", arch, weights=weights).weights["transformer"]


# ---------------------------------------------------------------------------- activations


def transformer_activation_bytes(spec: ModelSpec, width: int, height: int, frames: int, weights: str) -> int:
    """The transformer forward's peak of live activations: one pass (CFG's passes run one after the other)."""
    arch = spec.arch
    per_token = PER_TOKEN_DIM * arch.dim + PER_TOKEN_FFN * arch.ffn_dim
    fmt = formats.for_plan(weights)
    per_token += fmt.activation_bytes_per_token(arch.dim, arch.ffn_dim)
    fixed = fmt.activation_bytes_fixed(arch.dim, arch.ffn_dim)
    if spec.expand_timesteps:
        per_token += PER_TOKEN_TIMESTEP_DIM * arch.dim
    return math.ceil(spec.token_count(width, height, frames) * per_token + fixed)


def video_bytes(width: int, height: int, frames: int) -> int:
    """The decoded video as the VAE gives it: 3 channels of fp32 per pixel."""
    return 3 * frames * height * width * 4


def tile_overlap(side: int, vae_scale: int) -> float:
    """How much of one side diffusers' overlapping tiles cover, in multiples of the side."""
    latent, tile, stride = side // vae_scale, VAE_TILE // vae_scale, VAE_TILE_STRIDE // vae_scale
    return sum(min(tile, latent - start) for start in range(0, latent, stride)) / latent


def vae_decode_bytes(vae_scale: int, width: int, height: int, frames: int, tiled: bool) -> int:
    """The VAE decode's peak: untiled, one latent frame's working set at full size and the video twice
    (its growing concatenation); tiled, one tile's working set and the decoded tiles, or at the end the
    tiles, their blended rows, the joined video and its clamped copy."""
    video = video_bytes(width, height, frames)
    per_pixel = VAE_DECODE_PER_PIXEL[vae_scale]
    if not tiled or (width <= VAE_TILE and height <= VAE_TILE):
        return per_pixel * width * height + 2 * video
    held = tile_overlap(width, vae_scale) * tile_overlap(height, vae_scale)
    peak = max(per_pixel * VAE_TILE**2 + held * video, (held + 3) * video)
    return math.ceil(1.02 * peak) + HELD_BYTES


def vae_encode_bytes(vae_scale: int, width: int, height: int, frames: int, tiled: bool) -> int:
    """The VAE encode of image-to-video's conditioning frames (the image, and zeros after it; TI2V-5B's
    image alone): the frames themselves, built twice over, and the encoder's working set."""
    first, video = VAE_ENCODE_PER_PIXEL[vae_scale]
    per_pixel = first if frames == 1 else video
    # diffusers cuts Wan2.2's encode tiles after its 2x2 patching, in patched pixels: 512 px squares
    tile = VAE_TILE * (2 if vae_scale == 16 else 1)
    pixels = min(width * height, tile**2) if tiled else width * height
    return per_pixel * pixels + 2 * video_bytes(width, height, frames)


# ---------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Step:
    """One part of a stage: what runs, what is on the GPU while it does, and the peak."""

    name: str  # "text", "image", "vae-encode", "denoise", "denoise-2" (the low-noise expert), "decode"
    stage: str  # "encode", "denoise" or "decode"
    resident: tuple[str, ...]  # whole components on the GPU
    streamed: tuple[str, ...]  # components on the GPU a part at a time (their window is counted)
    weight_bytes: int
    activation_bytes: int

    @property
    def peak_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes + HELD_BYTES

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.name,
            "components": sorted((*self.resident, *self.streamed)),
            "streamed": list(self.streamed),
            "weight_bytes": self.weight_bytes,
            "activation_bytes": self.activation_bytes,
            "peak_bytes": self.peak_bytes,
        }


@dataclass(frozen=True)
class MemoryPlan:
    """Where a variant's components live on a GPU of `gpu_bytes`, stage by stage, and what the host holds."""

    variant: str
    gpu_bytes: int
    weights: str  # the weight format's name (wanlora.weights.formats)
    mode: str
    vae_tiling: bool
    steps: tuple[Step, ...]
    pinned_bytes: int
    pageable_bytes: int
    size: tuple[int, int, int]  # (width, height, frames) planned for

    @property
    def budget_bytes(self) -> int:
        return int(USABLE * self.gpu_bytes)

    @property
    def peak_bytes(self) -> int:
        return max(step.peak_bytes for step in self.steps)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.budget_bytes

    def stage(self, name: str) -> list[Step]:
        return [step for step in self.steps if step.stage == name]

    def resident_at_decode(self) -> int:
        """The weights on the GPU while the VAE decodes."""
        return next(step.weight_bytes for step in self.steps if step.name == "decode")

    def why(self) -> str:
        width, height, frames = self.size
        worst = max(self.steps, key=lambda step: step.peak_bytes)
        text = (
            f"{MODE_WORDS[self.mode]}: peak {worst.peak_bytes / 1e9:.1f} of {self.budget_bytes / 1e9:.1f} GB usable "
            f"({worst.stage}, {width}x{height}, {frames} frames)"
        )
        return text + ("; the VAE tiled, as untiled it would not fit" if self.vae_tiling else "")

    def as_dict(self) -> dict[str, Any]:
        stages = {}
        for name in STAGES:
            steps = self.stage(name)
            stages[name] = {
                "components": sorted({c for step in steps for c in (*step.resident, *step.streamed)}),
                "peak_bytes": max(step.peak_bytes for step in steps),
                "steps": [step.as_dict() for step in steps],
            }
        width, height, frames = self.size
        return {
            "variant": self.variant,
            "gpu_bytes": self.gpu_bytes,
            "weights": self.weights,
            "mode": self.mode,
            "budget_bytes": self.budget_bytes,
            "fits": self.fits,
            "vae_tiling": self.vae_tiling,
            "size": {"width": width, "height": height, "frames": frames},
            "stages": stages,
            "host": {"pinned_bytes": self.pinned_bytes, "pageable_bytes": self.pageable_bytes},
        }


MODE_WORDS = {
    "none": "everything resident",
    "encoder": "everything resident but the text encoder, streamed to encode",
    "experts": "one expert resident at a time, the text encoder streamed",
    "model": "each component on the GPU only while it runs",
    "group": "the transformer's blocks and the text encoder's layers streamed",
}


def pipeline_calls(spec: ModelSpec) -> list[tuple[str, str, str]]:
    """(step, stage, component) in the order diffusers' Wan pipelines call them, for the default request
    (image-to-video models with their image)."""
    calls = [("text", "encode", "text_encoder")]
    if spec.arch.image_dim:
        calls.append(("image", "encode", "image_encoder"))
    if spec.task.takes_images:
        calls.append(("vae-encode", "encode", "vae"))
    calls.append(("denoise", "denoise", "transformer"))
    if len(spec.experts) == 2:
        calls.append(("denoise-2", "denoise", "transformer_2"))
    calls.append(("decode", "decode", "vae"))
    return calls


def on_gpu(mode: str, names: list[str], calls: list[tuple[str, str, str]]) -> list[tuple[set[str], set[str]]]:
    """For each call: (the components resident, the ones streamed) in `mode`."""
    if mode == "model":  # diffusers' chain: a component comes when called, and sends back the one before it
        order: list[str] = [c for c in COMPONENTS if c in names]
        here: set[str] = set()
        placed: list[tuple[set[str], set[str]]] = []
        for _, _, component in calls:
            here.add(component)
            position = order.index(component)
            if position:
                here.discard(order[position - 1])
            placed.append((set(here), set()))
        return placed
    placed = []
    for step, _, component in calls:
        if mode == "none":
            placed.append((set(names), set()))
        elif mode == "group":
            streamed = {component} & {"text_encoder", "transformer", "transformer_2"}
            placed.append(({n for n in names if n in ("vae", "image_encoder")}, streamed))
        else:  # "encoder", "experts": the text encoder streams when it runs
            resident = set(names) - {"text_encoder"}
            if mode == "experts":  # the expert at work; between generations, the low-noise one (the last)
                resident -= {"transformer"} if step != "denoise" else {"transformer_2"}
            placed.append((resident, {"text_encoder"} if component == "text_encoder" else set()))
    return placed


def step_activations(spec: ModelSpec, step: str, size: tuple[int, int, int], weights: str, tiled: bool) -> int:
    width, height, frames = size
    if step == "text":
        return TEXT_ENCODE_BYTES
    if step == "image":
        return IMAGE_ENCODE_BYTES * (2 if spec.arch.takes_last_image else 1)
    if step == "vae-encode":
        # per-token timesteps (TI2V-5B) take the image as the first latent frame: the VAE encodes it alone; else
        # the image and the frames after it (zeros, or up to the last image) go in as channels, every frame encoded
        return vae_encode_bytes(spec.vae_scale, width, height, 1 if spec.expand_timesteps else frames, tiled)
    if step.startswith("denoise"):
        return transformer_activation_bytes(spec, width, height, frames, weights)
    return vae_decode_bytes(spec.vae_scale, width, height, frames, tiled)


def plan_steps(spec: ModelSpec, mode: str, sizes: Sizes, weights: str, tiled: bool, size) -> tuple[Step, ...]:
    calls = pipeline_calls(spec)
    windows = {
        "text_encoder": sizes.text_leaf_window if mode == "group" else sizes.text_window,
        "transformer": sizes.transformer_window,
        "transformer_2": sizes.transformer_window,
    }
    steps = []
    for (step, stage, _), (resident, streamed) in zip(calls, on_gpu(mode, list(sizes.weights), calls), strict=True):
        held = sum(sizes.weights[c] for c in resident) + sum(windows[c] for c in streamed)
        activations = step_activations(spec, step, size, weights, tiled)
        steps.append(Step(step, stage, tuple(sorted(resident)), tuple(sorted(streamed)), held, activations))
    return tuple(steps)


def host_bytes(mode: str, sizes: Sizes) -> tuple[int, int]:
    """(pinned, pageable) host bytes of weights in `mode`, once it has settled."""
    weights = sizes.weights
    experts = [weights[c] for c in ("transformer", "transformer_2") if c in weights]
    text = weights["text_encoder"]
    if mode == "encoder":
        return text, 0
    if mode == "experts":  # each expert keeps its host copy while on the GPU: leaving unchanged copies nothing
        return text + sum(experts), 0
    if mode == "group":
        return text + sum(experts), 0
    if mode == "model":
        return 0, sum(weights.values())
    return 0, 0


def default_size(spec: ModelSpec) -> tuple[int, int, int]:
    width, height = next(iter(spec.presets[spec.default_resolution].values()))
    return width, height, spec.default_frames


def plan_memory(
    spec: ModelSpec,
    gpu_bytes: int,
    weights: str = "bf16",
    sizes: Sizes | None = None,
    size: tuple[int, int, int] | None = None,
    mode: str | None = None,
) -> MemoryPlan:
    """The fastest mode (or `mode`) whose every stage fits 90% of `gpu_bytes` at `size` (the variant's default:
    its first resolution, 16:9, its default frames), the VAE untiled where that fits. `sizes` are the
    components' (measured on the loaded model, or at the published shapes). When nothing fits, the last
    try ("group", tiled), which `fits` says does not."""
    sizes = sizes or catalogue_sizes(spec, weights)
    size = size or default_size(spec)
    plan = None
    for candidate, tiled in CANDIDATES:
        if (mode or candidate) != candidate or (candidate == "experts" and len(spec.experts) != 2):
            continue
        pinned, pageable = host_bytes(candidate, sizes)
        steps = plan_steps(spec, candidate, sizes, weights, tiled, size)
        plan = MemoryPlan(spec.name, int(gpu_bytes), weights, candidate, tiled, steps, pinned, pageable, size)
        if plan.fits:
            return plan
    assert plan is not None
    return plan


def check_offload(mode: str, device: torch.device, spec: ModelSpec) -> str:
    """`mode` checked against the device and the model, before anything loads; "auto" stays "auto"."""
    if mode not in OFFLOAD_MODES:
        raise InvalidInput("offload", mode, f"one of {', '.join(OFFLOAD_MODES)}")
    if mode in ("auto", "none"):
        return mode
    if device.type != "cuda":
        raise InvalidInput("offload", mode, f"offloading moves weights to a GPU on demand; the model is on {device}")
    if mode == "experts" and len(spec.experts) != 2:
        raise InvalidInput("offload", mode, "a model with two experts (Wan2.2 A14B)")
    return mode


# ---------------------------------------------------------------------------- the catalogue's plans


def catalogue_plans() -> list[MemoryPlan]:
    """Every variant x GPU size x weight dtype, as `offload="auto"` plans it.

    Each variant's components are traced on `meta` the first time (seconds each): a notice says which, so
    that `wanlora models --memory` is not silent meanwhile."""
    plans = []
    for number, spec in enumerate(CATALOGUE.values(), start=1):
        logger.log(NOTICE, "tracing %s's components on the meta device (%d of %d)", spec.name, number, len(CATALOGUE))
        plans += [plan_memory(spec, gb * 2**30, weights) for weights in WEIGHT_DTYPES for gb in GPU_SIZES_GB]
    return plans


MEMORY_LEGEND = (
    "variant: the catalogue's name; weights: the transformer's dtype (--quantize); GB: the transformer's "
    "weights (both experts on A14B).\n"
    "Each GPU column: what --offload auto picks on a GPU of that size (`VAE tiled`: the decode tiles to fit; "
    "`does not fit`: not even the last mode), then the peak GPU memory / the host memory the weights take, "
    "in GB, at the variant's default size."
)


def memory_table() -> str:
    """What `offload="auto"` picks per variant, weight dtype and GPU, with the peak GPU and host memory; then
    the legend."""
    header = "| variant | weights | GB | " + " | ".join(f"{gb} GB GPU" for gb in GPU_SIZES_GB) + " |"
    lines = [header, "|---|---|---|" + "---|" * len(GPU_SIZES_GB)]
    plans = {(p.variant, p.weights, p.gpu_bytes // 2**30): p for p in catalogue_plans()}
    for spec in CATALOGUE.values():
        for weights in WEIGHT_DTYPES:
            experts = sum(b for c, b in catalogue_sizes(spec, weights).weights.items() if c.startswith("transformer"))
            cells = [_cell(plans[(spec.name, weights, gb)]) for gb in GPU_SIZES_GB]
            lines.append(f"| `{spec.name}` | {weights} | {experts / 1e9:.1f} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", MEMORY_LEGEND])


def format_plans(name: str) -> list[MemoryPlan]:
    """Every variant x plan of the file format `name` (its files' types) x GPU size, its smaller cards too."""
    entry = formats.BY_NAME[name]
    return [
        plan_memory(spec, gb * 2**30, plan)
        for spec in CATALOGUE.values()
        for plan in entry.plans
        for gb in (*entry.cards_gb, *GPU_SIZES_GB)
    ]


def format_table(name: str) -> str:
    """`memory_table` for a file format's types (`wanlora models --memory --format gguf`)."""
    entry = formats.BY_NAME[name]
    cards = (*entry.cards_gb, *GPU_SIZES_GB)
    lines = ["| variant | weights | GB | " + " | ".join(f"{gb} GB GPU" for gb in cards) + " |"]
    lines.append("|---|---|---|" + "---|" * len(cards))
    plans = {(p.variant, p.weights, p.gpu_bytes // 2**30): p for p in format_plans(name)}
    for spec in CATALOGUE.values():
        for weights in entry.plans:
            experts = sum(b for c, b in catalogue_sizes(spec, weights).weights.items() if c.startswith("transformer"))
            cells = [_cell(plans[(spec.name, weights, gb)]) for gb in cards]
            lines.append(f"| `{spec.name}` | {weights} | {experts / 1e9:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(plan: MemoryPlan) -> str:
    mark = "" if plan.fits else " (does not fit)"
    tiled = ", VAE tiled" if plan.vae_tiling else ""
    host = (plan.pinned_bytes + plan.pageable_bytes) / 1e9
    return f"`{plan.mode}`{tiled}{mark}: {plan.peak_bytes / 1e9:.1f} / {host:.1f}"


def memory_json() -> list[dict[str, Any]]:
    return [plan.as_dict() for plan in catalogue_plans()]


def gpu_plan(device: torch.device, spec: ModelSpec, mode: str, weights: str, sizes: Sizes) -> MemoryPlan:
    """The plan for the loaded model (its components measured) on this GPU: `mode`, or with "auto" the fastest
    that fits; logged."""
    total = torch.cuda.get_device_properties(device).total_memory
    plan = plan_memory(spec, total, weights, sizes, mode=None if mode == "auto" else mode)
    if plan.fits and mode == "auto":  # a choice made for the user: said without -v
        logger.log(NOTICE, "offload auto: %s on this %.0f GiB GPU (%s)", plan.mode, total / 2**30, plan.why())
    elif plan.fits:
        logger.info("offload %s: %s (%s)", mode, plan.mode, plan.why())
    else:
        logger.warning("offload %s: %s, and even that may not fit: %s", mode, plan.mode, plan.why())
    return plan


def vae_tiling_for(plan: MemoryPlan | None, vae_scale: int, width: int, height: int, frames: int) -> str | None:
    """None to decode untiled (the reference's own computation), else why the VAE must tile at this size."""
    if plan is None:  # not on a GPU: nothing to fit
        return None
    need = plan.resident_at_decode() + vae_decode_bytes(vae_scale, width, height, frames, False) + HELD_BYTES
    if need <= plan.budget_bytes:
        return None
    return f"untiled it needs {need / 1e9:.1f} GB of the {plan.budget_bytes / 1e9:.1f} GB usable"
