"""fp8 weights: the layout, the math of a quantized merge, and generation with them everywhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wanlora import InvalidInput, LoraFormatError, WanLoraPipeline
from wanlora.lora.layouts import read_lora
from wanlora.lora.merge import LoraMerger
from wanlora.tiny import tiny_transformer
from wanlora.weights.formats.fp8 import (
    FP8,
    FP8_MAX,
    Fp8Linear,
    dequantize,
    fp8_layers,
    quantize_rows,
    quantize_transformer,
)

from .builders import write_lora
from .conftest import SMALL, recorded
from .lora_helpers import merge


def bits(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as raw bytes: fp8 rows and their scales included, NaN or not."""
    return {name: t.detach().flatten().view(torch.uint8).clone() for name, t in module.state_dict().items()}


def assert_same_bits(module: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    for name, now in bits(module).items():
        assert torch.equal(now, reference[name]), f"{name} differs"


def fp8_tiny(seed: int = 0, arch=None) -> torch.nn.Module:
    model = tiny_transformer(seed=seed) if arch is None else tiny_transformer(arch, seed=seed)
    quantize_transformer(model)
    return model


# ------------------------------------------------------------------ the layout


def test_rows_are_scaled_by_their_own_amax_and_rounded_to_nearest_even():
    rows = torch.tensor([[0.5, -2.0, 1.0], [0.0, 0.0, 0.0], [1e-3, 3e-3, -7e-3]])
    quantized, scale = quantize_rows(rows)
    assert quantized.dtype == FP8 and scale.dtype == torch.float32
    assert scale.tolist() == pytest.approx([2.0 / 448, 1.0, 7e-3 / 448])
    assert quantized.float().abs().amax(dim=1).tolist() == [448.0, 0.0, 448.0]  # each row uses fp8's whole range
    want = (rows.double() / scale.double()[:, None]).float().to(FP8)  # one rounding, torch's (to nearest even)
    assert torch.equal(quantized.view(torch.uint8), want.view(torch.uint8))
    back = dequantize(quantized, scale)
    assert ((back - rows).abs() <= scale[:, None] * 16).all()  # within half a step of e4m3's coarsest binade
    again, again_scale = quantize_rows(rows.clone())
    assert torch.equal(again.view(torch.uint8), quantized.view(torch.uint8)) and torch.equal(again_scale, scale)


def test_block_linears_become_fp8_and_nothing_else_does():
    model = tiny_transformer()
    linears = [n for n, m in model.named_modules() if n.startswith("blocks.") and type(m) is torch.nn.Linear]
    others = {n: p.clone() for n, p in model.named_parameters() if not n.startswith("blocks.") or "norm" in n}
    assert quantize_transformer(model) == len(linears) > 0
    layers = fp8_layers(model)
    assert sorted(layers) == sorted(f"{n}.weight" for n in linears)
    assert all(
        layer.weight.dtype == FP8 and layer.weight_scale.shape == (layer.out_features,) for layer in layers.values()
    )
    for name, param in model.named_parameters():
        if name in others:
            assert torch.equal(param, others[name]), name  # embeddings, modulation, norms and the head as they were


@pytest.mark.parametrize("matmul", ["weight-only", "scaled"])
def test_an_fp8_linear_computes_with_its_dequantized_weight(matmul):
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 48).requires_grad_(False)
    linear.weight.copy_(torch.randn(48, 64, generator=generator) * 0.05)
    layer = Fp8Linear.of(linear, matmul)
    x = torch.randn(2, 5, 64, generator=generator)
    want = torch.nn.functional.linear(x, dequantize(layer.weight, layer.weight_scale), linear.bias)
    got = layer(x)
    assert got.shape == (2, 5, 48)
    if matmul == "weight-only":
        assert torch.equal(got, want)
    else:  # the activations rounded to fp8 too, per token: e4m3's 3 mantissa bits
        assert (got - want).abs().max() <= 0.07 * want.abs().max()


def test_the_14b_transformer_in_fp8_is_under_16_gb_with_its_400_block_linears():
    from wanlora.models import CATALOGUE
    from wanlora.weights.dense import cast_keeping_fp32

    with torch.device("meta"):
        model = tiny_transformer(CATALOGUE["t2v-14b"].arch)
    cast_keeping_fp32(model, torch.bfloat16)  # as loaded on a GPU
    bf16_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert quantize_transformer(model) == 400
    fp8_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert fp8_bytes <= 16e9 < bf16_bytes


# ------------------------------------------------------------------ exact merges into fp8


@pytest.fixture(scope="module")
def fp8_pool(tmp_path_factory):
    """Three LoRAs of different layouts over overlapping modules, read; `deltas` holds what each means."""
    folder = tmp_path_factory.mktemp("fp8-loras")
    model = tiny_transformer()
    made = {}
    for name, layout, seed in (("a", "original", 1), ("b", "loha", 2), ("c", "full-deltas", 3)):
        made[f"deltas-{name}"] = write_lora(folder / f"{name}.safetensors", model, layout, seed=seed)
        made[name] = read_lora(folder / f"{name}.safetensors")
    return made


STRENGTHS = st.floats(min_value=-2, max_value=3, allow_nan=False, allow_infinity=False, width=32)
SETS = st.lists(st.tuples(st.sampled_from("abc"), STRENGTHS), max_size=3, unique_by=lambda r: r[0])


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1], ids=["wan21-or-high-expert", "low-expert"])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=st.lists(SETS, min_size=1, max_size=4))
def test_after_any_history_fp8_weights_and_scales_are_a_fresh_quantized_merge(fp8_pool, seed, history):
    """Seed 0 is tiny Wan2.1 and A14B's high-noise expert, seed 1 its low-noise one (tests/test_wan22.py)."""
    model = fp8_tiny(seed)
    merger = LoraMerger(model)
    for requests in history:
        merge(merger, [(fp8_pool[key], strength) for key, strength in requests])
    fresh = fp8_tiny(seed)
    merge(LoraMerger(fresh), [(fp8_pool[key], strength) for key, strength in history[-1]])
    assert_same_bits(model, bits(fresh))


@pytest.fixture(scope="module")
def fp8_a14b():
    return WanLoraPipeline.from_pretrained("tiny-t2v-a14b", quantize="fp8")


EXPERT_SETS = st.lists(
    st.tuples(st.sampled_from("abc"), STRENGTHS, st.sampled_from(["both", "high", "low"])),
    max_size=3,
    unique_by=lambda r: r[0],
)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=st.lists(EXPERT_SETS, min_size=1, max_size=4))
def test_both_a14b_experts_in_fp8_hold_a_fresh_quantized_merge_after_any_history(fp8_a14b, fp8_pool, history):
    for requests in history:
        fp8_a14b.set_loras([(fp8_pool[key].path, strength, target) for key, strength, target in requests])
    for expert, seed in zip(fp8_a14b.experts, (0, 1), strict=True):  # the tiny experts' seeds (tests/test_wan22.py)
        fresh = fp8_tiny(seed)
        own = [(fp8_pool[key], s) for key, s, target in history[-1] if target in ("both", expert.name)]
        merge(LoraMerger(fresh), own)
        assert_same_bits(expert.module, bits(fresh))


def test_a_merge_is_the_quantized_sum_of_the_base_and_the_deltas(fp8_pool):
    model = fp8_tiny()
    base = {name: dequantize(layer.weight, layer.weight_scale).double() for name, layer in fp8_layers(model).items()}
    merge(LoraMerger(model), [(fp8_pool["a"], 0.8), (fp8_pool["c"], -1.5)])
    deltas = [(fp8_pool["deltas-a"], 0.8), (fp8_pool["deltas-c"], -1.5)]
    for name, layer in fp8_layers(model).items():
        exact = base[name] + sum(s * d[name].double().reshape(base[name].shape) for d, s in deltas if name in d)
        amax = exact.abs().amax(dim=1)
        assert torch.allclose(layer.weight_scale.double(), amax / FP8_MAX, rtol=1e-6), name  # scales from the sum
        step = layer.weight_scale.double()[:, None] * 32  # e4m3: 3 mantissa bits, so 1/16 of 448's binade, x2
        assert ((dequantize(layer.weight, layer.weight_scale).double() - exact).abs() <= step / 2 + 1e-9).all(), name


def test_the_empty_set_gives_back_the_quantized_base_bitwise(fp8_pool):
    model = fp8_tiny()
    base = bits(model)
    merger = LoraMerger(model)
    merge(merger, [(fp8_pool["a"], 1.0), (fp8_pool["b"], 0.5)])
    assert merger.plan and any(not torch.equal(now, base[name]) for name, now in bits(model).items())
    merge(merger, [])
    assert_same_bits(model, base)


def test_a_nan_lora_or_a_write_that_fails_leaves_fp8_weights_and_scales_as_they_were(fp8_pool, tmp_path, monkeypatch):
    from wanlora.lora import merge as merge_module

    model = fp8_tiny()
    merger = LoraMerger(model)
    merge(merger, [(fp8_pool["a"], 1.0)])
    before = bits(model)
    tensors = write_lora(tmp_path / "nan.safetensors", tiny_transformer(), "original", seed=4)
    assert tensors
    from safetensors.torch import load_file, save_file

    poisoned = load_file(tmp_path / "nan.safetensors")
    key = next(k for k in poisoned if k.endswith("lora_up.weight"))
    poisoned[key] = torch.full_like(poisoned[key], float("nan"))
    save_file(poisoned, tmp_path / "nan.safetensors")
    with pytest.raises(LoraFormatError, match="NaN|not finite"):
        merge(merger, [(read_lora(tmp_path / "nan.safetensors"), 1.0)])
    assert_same_bits(model, before)

    monkeypatch.setattr(merge_module, "CPU_CHUNK_ELEMENTS", 24 * 4)
    calls = {"n": 0}
    from wanlora.weights.formats import fp8 as fp8_module  # the format's final rounding, which the merge calls

    original = fp8_module.quantize_rows_into

    def failing(rows, out):
        calls["n"] += 1
        if calls["n"] == 7:  # some rows of this tensor (and all of others) written already
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return original(rows, out)

    monkeypatch.setattr(fp8_module, "quantize_rows_into", failing)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        merge(merger, [(fp8_pool["b"], 2.0), (fp8_pool["c"], -1.0)])
    monkeypatch.setattr(fp8_module, "quantize_rows_into", original)
    assert_same_bits(model, before)


# ------------------------------------------------------------------ generating with fp8 weights

IMAGE_KINDS = {"tiny-i2v", "tiny-i2v-a14b"}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny", "tiny-i2v", "tiny-t2v-a14b", "tiny-i2v-a14b", "tiny-ti2v-5b"])
def test_every_tiny_kind_generates_in_fp8_close_to_full_precision(model, fp8_pool):
    from PIL import Image

    image = {"image": Image.new("RGB", (64, 64), (200, 90, 40))} if model in IMAGE_KINDS else {}
    request = {"prompt": "a fox", "seed": 3, "width": 64, "height": 64, "num_frames": 5, "num_inference_steps": 2}
    full = WanLoraPipeline.from_pretrained(model).generate(**request, **image)
    pipe = WanLoraPipeline.from_pretrained(model, quantize="fp8")
    assert all(fp8_layers(expert.module) for expert in pipe.experts)
    video = pipe.generate(**request, **image)
    assert video.metadata["weights"] == "fp8" and full.metadata["weights"] == "full precision"
    error = np.mean((video.frames.astype(float) - full.frames.astype(float)) ** 2)
    assert 10 * np.log10(255**2 / max(error, 1e-12)) > 30  # noise from random weights, but the same noise


@pytest.mark.slow
def test_loras_swap_on_an_fp8_pipeline_and_come_off_bitwise(tmp_path):
    pipe = WanLoraPipeline.from_pretrained("tiny", quantize="fp8")
    base = bits(pipe.transformer)
    path = tmp_path / "style.safetensors"
    write_lora(path, tiny_transformer(), "original", seed=5)
    plain = pipe.generate("a fox", seed=2, **SMALL)
    styled = pipe.generate("a fox", loras=[(str(path), 1.0)], seed=2, **SMALL)
    assert not np.array_equal(plain.frames, styled.frames)
    again = pipe.generate("a fox", loras=[], seed=2, **SMALL)
    assert_same_bits(pipe.transformer, base)
    assert np.array_equal(plain.frames, again.frames)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny", "tiny-i2v", "tiny-t2v-a14b", "tiny-i2v-a14b", "tiny-ti2v-5b"])
def test_the_cli_generates_in_fp8(cli, tmp_path, model):
    from PIL import Image

    Image.new("RGB", (64, 64), (30, 140, 90)).save(tmp_path / "start.png")
    image = ["--image", str(tmp_path / "start.png")] if model in IMAGE_KINDS else []
    out = tmp_path / "fp8.mp4"
    result = cli("generate", "a fox", "--model", model, "--quantize", "fp8", "--frames", "5", "--steps", "2",
                 "--width", "64", "--height", "64", *image, "-o", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (recorded(out)["weights"], recorded(out)["model"]) == ("fp8", model)


def test_the_cli_names_an_unknown_quantization(cli):
    refused = cli("generate", "a fox", "--model", "tiny", "--quantize", "int4")
    assert refused.returncode == 2 and "invalid choice: 'int4'" in refused.stderr


def test_an_fp8_pipeline_is_not_saved_as_a_folder_no_loader_reads(tmp_path):
    with pytest.raises(InvalidInput, match="none to save a merged model"):
        WanLoraPipeline.from_pretrained("tiny", quantize="fp8").save_merged(tmp_path / "baked")
    assert not (tmp_path / "baked").exists()


def test_an_unknown_quantization_is_named():
    with pytest.raises(InvalidInput, match="quantize='int4' is not allowed: one of none, fp8"):
        WanLoraPipeline.from_pretrained("tiny", quantize="int4")


# ------------------------------------------------------------------ the scaled matmul: probed, held to CUDA's rules


def test_the_scaled_matmul_is_chosen_by_running_its_kernel_not_by_the_capability(monkeypatch, caplog):
    """An RTX 5090 (sm_120) has fp8 tensor cores, and PyTorch's row-wise kernel raises there: weight-only, said why."""
    import logging

    from wanlora.weights.formats import fp8

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (12, 0))
    refusal = "raises RuntimeError: Rowwise scaling is not currently supported on your device"
    monkeypatch.setattr(fp8, "scaled_matmul_failure", lambda device: refusal)
    caplog.set_level(logging.INFO, logger="wanlora")
    assert fp8.choose_matmul("auto", cuda) == "weight-only"
    assert "weight-only matmuls on cuda:0: the scaled fp8 kernel raises RuntimeError: Rowwise scaling" in caplog.text
    with pytest.raises(InvalidInput, match="on cuda:0 the scaled kernel raises"):
        fp8.choose_matmul("scaled", cuda)
    monkeypatch.setattr(fp8, "scaled_matmul_failure", lambda device: None)
    assert fp8.choose_matmul("auto", cuda) == "scaled"


def test_the_probe_runs_the_real_kernel_and_checks_its_numbers(monkeypatch):
    from wanlora.weights.formats import fp8

    cpu = torch.device("cpu")
    fp8._probe.cache_clear()
    assert fp8.scaled_matmul_failure(cpu) is None  # the CPU's kernel runs, and agrees with weight-only
    real = torch._scaled_mm

    def sm120(*args, **kwargs):
        raise RuntimeError("Rowwise scaling is not currently supported on your device")

    for kernel, words in (
        (sm120, "raises RuntimeError: Rowwise scaling"),
        (lambda *a, **k: real(*a, **k) * 2, "off by"),
    ):
        fp8._probe.cache_clear()
        monkeypatch.setattr(torch, "_scaled_mm", kernel)
        assert words in fp8.scaled_matmul_failure(cpu)
    fp8._probe.cache_clear()


def fp8_operands(m: int = 32, k: int = 64, n: int = 48):
    generator = torch.Generator().manual_seed(0)
    a = (torch.randn(m, k, generator=generator) * 10).to(FP8)
    b, scale = quantize_rows(torch.randn(n, k, generator=generator))
    return a, b.t(), torch.ones(m, 1), scale.view(1, -1)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"out_dtype": torch.float32, "bias": torch.zeros(48, dtype=torch.bfloat16)}, "Bias is not supported"),
        ({"out_dtype": torch.float16}, "outputs bfloat16 only"),
        ({"b": "e5m2"}, "mat2 e4m3fn"),
        ({"k": 40}, "divisible by 16"),
        ({"b": "row-major"}, "mat2 column-major"),
        ({"scale_a": torch.ones(32)}, r"scale_a must be float32 of shape \(32, 1\)"),
        ({"bias": torch.zeros(48)}, "the bias must be 1-D bfloat16"),
    ],
    ids=["fp32-out-with-bias", "fp16-out", "e5m2-weight", "unaligned", "layout", "scale-shape", "fp32-bias"],
)
def test_cudas_rules_for_the_scaled_matmul_hold_on_any_device(change, words):
    from wanlora.weights.formats.fp8 import ScaledMatmulRefused, check_scaled_mm

    a, b, scale_a, scale_b = fp8_operands()
    check_scaled_mm(a, b, scale_a, scale_b, torch.zeros(48, dtype=torch.bfloat16), torch.bfloat16)  # as asked of it
    a, b, scale_a, scale_b = fp8_operands(k=change.get("k", 64))
    if change.get("b") == "e5m2":
        b = b.float().to(torch.float8_e5m2)
    elif change.get("b") == "row-major":
        b = b.contiguous()
    scale_a = change.get("scale_a", scale_a)
    with pytest.raises(ScaledMatmulRefused, match=words):
        check_scaled_mm(a, b, scale_a, scale_b, change.get("bias"), change.get("out_dtype", torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_scaled_path_keeps_cudas_rules_with_a_bias_and_gives_no_nan_for_an_empty_token(dtype):
    from wanlora.weights.formats.fp8 import scaled_linear

    generator = torch.Generator().manual_seed(1)
    layer = Fp8Linear.of(torch.nn.Linear(64, 48).requires_grad_(False), "scaled")
    x = (torch.randn(6, 64, generator=generator)).to(dtype)
    x[2] = 0  # an all-zero token: in fp16 its scale must not underflow to 0 (0 / 0)
    got = scaled_linear(x, layer.weight, layer.weight_scale, layer.bias.to(dtype))
    want = torch.nn.functional.linear(x.float(), dequantize(layer.weight, layer.weight_scale), layer.bias)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert torch.allclose(got[2].float(), layer.bias.to(dtype).float())
    assert (got.float() - want).abs().max() <= 0.07 * want.abs().max()


def test_a_layer_outside_cudas_rules_computes_weight_only():
    """The tiny model's 24-wide layers (not a multiple of 16) and e5m2 weights: weight-only, even when "scaled"."""
    narrow = Fp8Linear.of(torch.nn.Linear(24, 24).requires_grad_(False), "scaled")
    e5m2 = Fp8Linear(*quantize_rows(torch.randn(32, 32), torch.float8_e5m2), None, "scaled")
    wide = Fp8Linear.of(torch.nn.Linear(32, 48).requires_grad_(False), "scaled")
    assert (narrow.scaled, e5m2.scaled, wide.scaled) == (False, False, True)
    x = torch.randn(3, 24)
    assert torch.equal(
        narrow(x), torch.nn.functional.linear(x, dequantize(narrow.weight, narrow.weight_scale), narrow.bias)
    )


def test_q_k_and_v_quantize_their_shared_input_once(monkeypatch):
    from dataclasses import replace

    from wanlora.models import TINY_ARCH
    from wanlora.weights.formats import fp8

    model = tiny_transformer(replace(TINY_ARCH, attention_head_dim=16))  # 32 wide: within CUDA's rules
    quantize_transformer(model, "scaled")
    calls = []
    real = fp8.quantize_tokens
    monkeypatch.setattr(fp8, "quantize_tokens", lambda rows: calls.append(rows.shape) or real(rows))
    inputs = {
        "hidden_states": torch.randn(1, 16, 2, 4, 4),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 512, 32),
    }
    with torch.no_grad():
        model(**inputs)
    # per block: q/k/v of self-attention once, its output, q of cross-attention, its output, the FFN's two; and k/v
    # of cross-attention once for every block: the text states are one tensor, unchanged through the forward
    assert len(calls) == 6 * len(model.blocks) + 1
    layer, x = fp8_layers(model)["blocks.0.attn1.to_q.weight"], torch.randn(5, 32)
    first = layer(x)
    x.mul_(2)  # changed in place: quantized afresh, never the stale copy
    assert torch.allclose(layer(x) - layer.bias, 2 * (first - layer.bias), rtol=0.02, atol=1e-3)


# ------------------------------------------------------------------ fp8 on the host, at memory speed


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_every_fp8_code_widens_exactly_without_torchs_scalar_conversion(dtype):
    from torch.utils._python_dispatch import TorchDispatchMode

    from wanlora.weights.formats.fp8 import dequantize_into

    codes = torch.arange(256, dtype=torch.uint8).view(dtype)
    finite = torch.isfinite(codes.float())
    quantized = codes[finite].view(-1, 1).repeat(1, 3)
    scale = torch.linspace(0.5, 3.0, quantized.shape[0])

    class Conversions(TorchDispatchMode):
        seen: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            tensors = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
            if any(t.dtype == dtype for t in tensors) and func.__name__.startswith(("copy_", "_to_copy")):
                self.seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    out = torch.empty(quantized.shape)
    with Conversions() as traced:
        dequantize_into(out, quantized, scale)
    assert not traced.seen  # fp8 -> fp32 by torch runs ~0.15 G values/s on a CPU core; this is fp16's vector path
    want = quantized.float() * scale[:, None]  # torch's own conversion, the reference
    assert torch.equal(out, want)


def test_fp8_quantizes_where_the_weights_will_live():
    """On the GPU for a resident transformer: the meta device stands in here; nothing fp8 runs on the CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = tiny_transformer()

    class Devices(TorchDispatchMode):
        cpu_fp8: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            outs = result if isinstance(result, (tuple, list)) else [result]
            if any(isinstance(t, torch.Tensor) and t.dtype == FP8 and t.device.type == "cpu" for t in outs):
                self.cpu_fp8.append(func.__name__)
            return result

    with Devices() as traced:
        layers = quantize_transformer(model, "weight-only", torch.device("meta"))
    assert layers > 0 and not traced.cpu_fp8
    assert all(layer.weight.device.type == "meta" for layer in fp8_layers(model).values())
