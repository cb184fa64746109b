"""GGUF weights: Wan transformers as city96 and QuantStack publish them, read, dequantized and requantized.

- `qtypes`: the GGML types (ids, blocks, bytes per weight);
- `dequant`, `quantize` (`kquants`): blocks <-> fp32 in torch, bit for bit as gguf-py and ggml's reference
  quantizers, on the CPU and on CUDA;
- `reader`: a GGUF Wan transformer file, checked, read into memory of its own, W0 read back by `pread`;
- `linear`: `GgufLinear`, a linear layer over the raw blocks, with LoRA terms beside its matmul.

The `gguf` package is needed to read files (`pip install 'wanlora[gguf]'`), and imported only there.
"""
