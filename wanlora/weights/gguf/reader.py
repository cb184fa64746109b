"""GGUF Wan transformers, as city96 (Wan2.1) and QuantStack (Wan2.2 A14B experts, TI2V-5B) publish them.

Layout (ComfyUI-GGUF's convert.py, its llama.cpp patch and fix_5d_tensors.py; issue 32's research):
`general.architecture` is "wan"; tensors carry the original Wan names (`blocks.0.self_attn.q.weight`,
no prefix; sd.cpp's conversions add `model.diffusion_model.`, stripped here). The 2-D block linears
are quantized, each in its own type (a Q4_K_M file mixes Q4_K, Q6_K, F16 and F32: a tensor's type is
never inferred from the file's name or `general.file_type`); embeddings and the head are F16; biases,
norms and modulations F32 (F16 or BF16 in some files); `patch_embedding.weight` is F32 with its five
dimensions; `blocks.N.modulation` is (1, 6, dim), or (6, dim) from converters without the fix.

`gguf`'s own reader parses the header (it is imported here only: the GPU image lacks it). The
tensors are then read with `pread` into memory of their own, never left as views of its file
mapping: a file cut short under a running model would turn the next touch of a mapped page into
SIGBUS. W0 is read back the same way (`GgufTransformer.read_back`), after checking that the file's
size and modification time are those it was loaded with (`CheckpointChanged` otherwise).

Nothing in the file is taken on its word: the architecture, each tensor's type (one wanlora
reads), its extent (inside the file), its name and shape (the model's, for the `ModelSpec` given:
else the error says which model the file is for), and every block's fp16 scales (finite).
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...errors import InvalidInput, ModelNotFound
from ...messages import listing
from ...models import Architecture, ModelSpec, families_of_width, transformer_kind
from ..held_file import HeldFile
from .dequant import dequantize
from .qtypes import BF16, F16, F32, OTHER_GGML_TYPES, READ_TYPES, QType

logger = logging.getLogger(__name__)

ARCHITECTURE = "wan"
COMFY_PREFIX = "model.diffusion_model."  # stable-diffusion.cpp's conversions keep ComfyUI's prefix
FLOAT_DTYPES = {F32: torch.float32, F16: torch.float16, BF16: torch.bfloat16}
FORM = "a GGUF Wan transformer file (general.architecture 'wan', as city96's and QuantStack's)"
INSTALL = "reading GGUF files needs the gguf package: pip install 'wanlora[gguf]'"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file's table: its name there, GGML type (None: one wanlora does not read), torch-order
    shape, and where its bytes lie."""

    name: str
    type_id: int
    qtype: QType | None
    shape: tuple[int, ...]
    offset: int  # from the start of the file
    nbytes: int

    @property
    def rows(self) -> int:
        """Rows as read back: a matrix's (or a higher tensor's) first dimension; a vector is one row."""
        return self.shape[0] if len(self.shape) >= 2 else 1

    @property
    def row_bytes(self) -> int:
        return self.nbytes // max(1, self.rows)

    def type_name(self) -> str:
        if self.qtype is not None:
            return self.qtype.name
        return OTHER_GGML_TYPES.get(self.type_id, f"type id {self.type_id}")


@dataclass(frozen=True)
class QuantizedTensor:
    """A tensor in GGML blocks: `data` is uint8 (*shape[:-1], row bytes), each row whole blocks of `qtype`."""

    qtype: QType
    shape: tuple[int, ...]
    data: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.data, self.qtype, dtype).view(self.shape)

    @property
    def nbytes(self) -> int:
        return self.data.numel()


def _gguf_reader() -> Any:
    try:
        import gguf
    except ImportError:
        raise ModelNotFound(INSTALL) from None
    return gguf.GGUFReader


class GgufFile(HeldFile):
    """One GGUF file, open for reading: its metadata and tensor table, each tensor read as a copy of its own."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            self.metadata, self.tensors = _parse(path)
            self.check_unchanged()  # the table just read is this file's
        except BaseException:
            self._handle.close()
            raise

    @property
    def size(self) -> int:
        return self._stat[0]

    def read(self, info: TensorInfo, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows start:stop of a tensor's raw bytes, uint8 (rows, row bytes), in memory of their own."""
        stop = info.rows if stop is None else stop
        target = torch.empty((stop - start, info.row_bytes), dtype=torch.uint8)
        if target.numel():
            self._read_into(target, info.offset + start * info.row_bytes)
        return target


def _parse(path: Path) -> tuple[dict[str, Any], list[TensorInfo]]:
    """(metadata: the string and number fields, tensor table), from gguf's reader, which maps the file: the
    header alone is touched, and nothing of the mapping outlives this call."""
    reader_class = _gguf_reader()
    table: list[TensorInfo] = []

    class TableReader(reader_class):  # type: ignore[misc, valid-type]
        """gguf's reader, keeping the tensor table and making no tensor views: its own tensor step maps every
        tensor (failing on a cut-short file) and refuses a type it does not know before saying which tensor."""

        def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
            for entry in fields:
                _, name, _, dims, type_id, offset = entry.parts
                table.append(
                    _tensor_info(
                        bytes(name).decode("utf-8", "replace"), dims, int(type_id[0]), start_offs + int(offset[0])
                    )
                )

    try:
        reader = TableReader(path)
    except ValueError as exc:
        if "magic" in str(exc):
            raise InvalidInput("transformer", str(path), f"{FORM}; this is not a GGUF file") from None
        raise InvalidInput("transformer", str(path), f"{FORM}; its header does not read ({exc})") from None
    except (IndexError, KeyError, OverflowError, UnicodeDecodeError) as exc:
        raise InvalidInput("transformer", str(path), f"{FORM}; its header is cut short or malformed ({exc})") from None
    metadata = {name: _field_value(entry) for name, entry in reader.fields.items() if not name.startswith("GGUF.")}
    del reader
    return metadata, table


def _tensor_info(name: str, dims: Any, type_id: int, offset: int) -> TensorInfo:
    shape = tuple(int(d) for d in reversed(dims.tolist()))  # GGML lists the fastest-moving dimension first
    qtype = READ_TYPES.get(type_id)
    count = math.prod(shape)
    if qtype is None or (shape and shape[-1] % qtype.block_size):
        nbytes = 0  # refused by the checks, each with its reason
    else:
        nbytes = count // qtype.block_size * qtype.type_size
    return TensorInfo(name, type_id, qtype, shape, offset, nbytes)


def _field_value(entry: Any) -> Any:
    """A metadata field's value: a string, a number, or None (arrays are not needed here)."""
    import gguf

    if len(entry.types) != 1 or not entry.data:
        return None
    part = entry.parts[entry.data[0]]
    if entry.types[0] == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8", "replace")
    return part.tolist()[0] if part.size == 1 else None


# ------------------------------------------------------------------------------------ the transformer


@dataclass
class GgufTransformer:
    """A GGUF Wan transformer, read and checked: `tensors` by diffusers parameter name, each a float tensor in
    the file's dtype (F32, F16, BF16) or a `QuantizedTensor`; `sources`: where each lies in `file`."""

    path: Path
    file: GgufFile
    tensors: dict[str, torch.Tensor | QuantizedTensor]
    sources: dict[str, TensorInfo]
    metadata: dict[str, Any] = field(default_factory=dict)

    def read_back(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor | QuantizedTensor:
        """Rows start:stop of parameter `name` as the file holds it (W0), read again from the file: a copy of
        its own. `CheckpointChanged` if the file was rewritten or cut short since it was loaded."""
        self.file.check_unchanged()
        info = self.sources[name]
        stop = info.rows if stop is None else stop
        shape = (stop - start, *info.shape[1:]) if len(info.shape) >= 2 else info.shape
        return _as_tensor(info, self.file.read(info, start, stop), shape)

    def types(self) -> Counter[str]:
        """How many tensors the file holds in each type (for logs and memory plans)."""
        return Counter(info.type_name() for info in self.sources.values())


def _as_tensor(info: TensorInfo, raw: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | QuantizedTensor:
    assert info.qtype is not None, "types are checked before anything is read"
    if info.qtype in FLOAT_DTYPES:
        return raw.view(FLOAT_DTYPES[info.qtype]).view(shape)
    row_bytes = info.qtype.row_bytes(shape[-1]) if shape else info.qtype.type_size
    return QuantizedTensor(info.qtype, shape, raw.view(*shape[:-1], row_bytes))


def read_transformer(path: str | Path, spec: ModelSpec) -> GgufTransformer:
    """The GGUF transformer in `path`, for `spec`'s architecture: every tensor checked, then read."""
    path = Path(path)
    try:
        file = GgufFile(path)
    except OSError as exc:
        raise ModelNotFound(f"cannot read the transformer file {path}: {exc.strerror or exc}") from None
    try:
        _check_architecture(path, file.metadata)
        _check_table(path, file)
        names = diffusers_names(path, [info.name for info in file.tensors])
        by_name = {info.name: info for info in file.tensors}
        sources = {name: by_name[key] for name, key in names.items()}
        unnamed = sorted(set(by_name) - set(names.values()))  # two of the file's names for one parameter
        _check_fits(path, sources, spec, unnamed)
        tensors = {}
        for name, info in sources.items():
            value = _as_tensor(info, file.read(info), info.shape)
            if isinstance(value, QuantizedTensor):
                _check_scales(path, info, value)
            tensors[name] = _fit_shape(value, _model_shapes(spec.arch)[name])
    except BaseException:
        file.close()
        raise
    counts = ", ".join(
        f"{count} {kind}" for kind, count in sorted(Counter(i.type_name() for i in sources.values()).items())
    )
    logger.info("read %s's transformer from %s: %s", spec.name, path.name, counts)
    return GgufTransformer(path, file, tensors, sources, file.metadata)


def _check_architecture(path: Path, metadata: dict[str, Any]) -> None:
    found = metadata.get("general.architecture")
    if found != ARCHITECTURE:
        said = "no general.architecture (another converter's file?)" if found is None else f"architecture {found!r}"
        raise InvalidInput("transformer", str(path), f"{FORM}; this one has {said}")


def _check_table(path: Path, file: GgufFile) -> None:
    """Each tensor of a type wanlora reads, whole blocks to a row, and inside the file."""
    problems = []
    readable = ", ".join(qtype.name for qtype in READ_TYPES.values())
    for info in file.tensors:
        if info.qtype is None:
            problems.append(f"{info.name} is {info.type_name()}, which wanlora does not read (it reads {readable})")
        elif not info.nbytes and 0 not in info.shape:
            problems.append(f"{info.name}: a row of {info.shape[-1]} is not whole {info.qtype} blocks")
        elif info.offset + info.nbytes > file.size:
            problems.append(
                f"{info.name} ends at byte {info.offset + info.nbytes}, past the file's end at {file.size} "
                "(cut short: an incomplete download?)"
            )
    if problems:
        raise InvalidInput("transformer", str(path), listing(f"{FORM}; here", problems))


def diffusers_names(path: Path, keys: list[str]) -> dict[str, str]:
    """{diffusers parameter name: the file's tensor name}, by diffusers' own Wan converter (which only renames)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    placeholders = {key: torch.empty(0, device="meta") for key in keys}
    original = {id(value): key for key, value in placeholders.items()}
    try:
        converted = convert_wan_transformer_to_diffusers(
            {k.removeprefix(COMFY_PREFIX): v for k, v in placeholders.items()}
        )
    except (KeyError, ValueError, IndexError) as exc:
        raise InvalidInput("transformer", str(path), f"{FORM}; its tensor names are not Wan's ({exc})") from None
    return {name: original[id(value)] for name, value in converted.items() if id(value) in original}


@functools.cache
def _model_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """{parameter name: shape} of the diffusers transformer of `arch`, built on meta."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    with init_empty_weights():
        model = WanTransformer3DModel(**arch.transformer_config())
    return {name: tuple(param.shape) for name, param in model.named_parameters()}


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Without leading 1s: a modulation stored (6, dim) by converters without ComfyUI-GGUF's fix is (1, 6, dim)."""
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape


def _check_fits(path: Path, sources: dict[str, TensorInfo], spec: ModelSpec, unnamed: list[str]) -> None:
    shapes = _model_shapes(spec.arch)
    missing = sorted(set(shapes) - set(sources))
    extra = [sources[name].name for name in sorted(set(sources) - set(shapes))] + unnamed
    wrong = [
        f"{info.name} {info.shape} vs {shapes[name]}"
        for name, info in sources.items()
        if name in shapes and _squeezed(info.shape) != _squeezed(shapes[name])
    ]
    if not (missing or extra or wrong):
        return
    patch = "patch_embedding.weight"
    why = {
        patch: f"missing {patch} (Wan's 5-D patch embedding: a file converted without ComfyUI-GGUF's fix_5d_tensors)"
    }
    problems = wrong or [why.get(name, f"missing {name}") for name in missing] + [f"unexpected {key}" for key in extra]
    raise InvalidInput(
        "transformer",
        str(path),
        listing(f"a {spec.name} transformer file{_looks_like(sources)}, or another --model", problems),
    )


def _looks_like(sources: dict[str, TensorInfo]) -> str:
    """ ", by its width (W) it is FAMILY": what the file's own shapes say it is for."""
    query = sources.get("blocks.0.attn1.to_q.weight")
    if query is None or not query.shape:
        return ""
    width = query.shape[0]
    image_branch = any(name.startswith("condition_embedder.image_embedder.") for name in sources)
    patch = sources.get("patch_embedding.weight")
    in_channels = patch.shape[1] if patch is not None and len(patch.shape) == 5 else None
    families = families_of_width(width, image_branch)
    if in_channels is not None and families:
        return f"; by its shapes (width {width}) it is a {transformer_kind(width, in_channels, image_branch)} one"
    return f"; by its width ({width}) it is {' or '.join(families)}" if families else f"; its width is {width}"


def _fit_shape(value: torch.Tensor | QuantizedTensor, shape: tuple[int, ...]) -> torch.Tensor | QuantizedTensor:
    """A tensor stored with or without the model's leading 1s (`_check_fits`), at the model's shape: a quantized
    one too (its rows are the same blocks, only the dimensions above them differ)."""
    if tuple(value.shape) == shape:
        return value
    if isinstance(value, QuantizedTensor):
        return QuantizedTensor(value.qtype, shape, value.data.view(*shape[:-1], value.data.shape[-1]))
    return value.view(shape)


def _check_scales(path: Path, info: TensorInfo, value: QuantizedTensor) -> None:
    """Every block's fp16 scales finite: a NaN or infinite one (a damaged file) would spread to every output."""
    blocks = value.data.view(-1, value.qtype.type_size)
    for offset in value.qtype.scale_offsets:
        bits = blocks[:, offset : offset + 2].view(torch.int16)
        if bool(((bits & 0x7C00) == 0x7C00).any()):
            raise InvalidInput(
                "transformer", str(path), f"{FORM}; here {info.name} holds NaN or infinite {value.qtype} block scales"
            )
