"""The GGML tensor types a GGUF Wan transformer holds: their ids, block sizes and bytes.

The ids are GGML's own (ggml.h's `ggml_type`, gguf-py's `GGMLQuantizationType`), so that a
file's raw type id maps here without the `gguf` package, which the GPU image lacks. A block
of `block_size` weights takes `type_size` bytes; a row of a quantized tensor is a whole
number of blocks (K-quants: 256 weights, the legacy types: 32).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QType:
    name: str
    id: int  # GGML's type id, as a GGUF file stores it
    block_size: int  # weights per block
    type_size: int  # bytes per block
    scale_offsets: tuple[int, ...] = ()  # where a block's fp16 scales (d, dmin or m) lie: checked finite on load

    @property
    def quantized(self) -> bool:
        return self.block_size > 1

    @property
    def bytes_per_weight(self) -> float:
        return self.type_size / self.block_size

    def row_bytes(self, columns: int) -> int:
        """Bytes of one row of `columns` weights; ValueError where the row is not a whole number of blocks."""
        if columns % self.block_size:
            raise ValueError(f"a {self.name} row holds whole blocks of {self.block_size} weights, not {columns}")
        return columns // self.block_size * self.type_size

    def __str__(self) -> str:
        return self.name


QK_K = 256  # weights in a K-quant super-block

F32 = QType("F32", 0, 1, 4)
F16 = QType("F16", 1, 1, 2)
BF16 = QType("BF16", 30, 1, 2)
Q4_0 = QType("Q4_0", 2, 32, 18, (0,))
Q4_1 = QType("Q4_1", 3, 32, 20, (0, 2))
Q5_0 = QType("Q5_0", 6, 32, 22, (0,))
Q5_1 = QType("Q5_1", 7, 32, 24, (0, 2))
Q8_0 = QType("Q8_0", 8, 32, 34, (0,))
Q2_K = QType("Q2_K", 10, QK_K, 84, (80, 82))
Q3_K = QType("Q3_K", 11, QK_K, 110, (108,))
Q4_K = QType("Q4_K", 12, QK_K, 144, (0, 2))
Q5_K = QType("Q5_K", 13, QK_K, 176, (0, 2))
Q6_K = QType("Q6_K", 14, QK_K, 210, (208,))

FLOAT_TYPES = (F32, F16, BF16)
LEGACY_TYPES = (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)
K_TYPES = (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)
READ_TYPES = {qtype.id: qtype for qtype in (*FLOAT_TYPES, *LEGACY_TYPES, *K_TYPES)}
BY_NAME = {qtype.name: qtype for qtype in READ_TYPES.values()}

# Every other type GGML defines, named for errors: a file may hold one, wanlora does not read it.
OTHER_GGML_TYPES = {
    9: "Q8_1",
    15: "Q8_K",
    16: "IQ2_XXS",
    17: "IQ2_XS",
    18: "IQ3_XXS",
    19: "IQ1_S",
    20: "IQ4_NL",
    21: "IQ3_S",
    22: "IQ2_S",
    23: "IQ4_XS",
    24: "I8",
    25: "I16",
    26: "I32",
    27: "I64",
    28: "F64",
    29: "IQ1_M",
    34: "TQ1_0",
    35: "TQ2_0",
    39: "MXFP4",
    40: "NVFP4",
    41: "Q1_0",
}


def qtype_of(value: QType | str | int) -> QType:
    """A type given as itself, its name ("Q4_K") or GGML id (12); ValueError for one wanlora does not read."""
    if isinstance(value, QType):
        return value
    found = BY_NAME.get(value) if isinstance(value, str) else READ_TYPES.get(value)
    if found is None:
        known = ", ".join(BY_NAME)
        raise ValueError(f"{value!r} is not a GGML type wanlora reads ({known})")
    return found
