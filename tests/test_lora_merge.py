"""The merge engine: exact, history-free, all-or-nothing; wired into the pipeline."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from wanlora import WanLoraPipeline
from wanlora.errors import InvalidInput, LoraFormatError, LoraMismatch, LoraNotFound
from wanlora.lora.deltas import LoraDelta
from wanlora.lora.layouts import read_lora
from wanlora.lora.merge import LoraMerger, Term
from wanlora.tiny import tiny_transformer

from .builders import write_lora
from .conftest import SMALL
from .lora_helpers import assert_bitwise, assert_weights, merge, snapshot


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Three LoRAs of different layouts over overlapping modules, and their deltas."""
    folder = tmp_path_factory.mktemp("loras")
    model = tiny_transformer()
    files = {}
    for name, layout, seed in (("a", "original", 1), ("b", "loha", 2), ("c", "full-deltas", 3)):
        path = folder / f"{name}.safetensors"
        files[name] = (str(path), write_lora(path, model, layout, seed=seed))
    return files


def reference_weights(model_factory, loras):
    """What a fresh model holds after applying `loras` once."""
    model = model_factory()
    merge(LoraMerger(model), loras)
    return snapshot(model)


def bf16_tiny():
    model = tiny_transformer()
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    return model


strengths = st.floats(min_value=-2, max_value=3, allow_nan=False, allow_infinity=False, width=32)
sets = st.lists(st.tuples(st.sampled_from("abc"), strengths), max_size=3, unique_by=lambda x: x[0])


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=st.lists(sets, min_size=1, max_size=6))
def test_any_swap_history_gives_bitwise_the_same_weights_as_one_apply(pool, history):
    """bf16 weights: the result depends only on the base and the last set, bit for bit."""
    loaded = {k: read_lora(path) for k, (path, _) in pool.items()}
    model = bf16_tiny()
    merger = LoraMerger(model)
    for request in history:
        merge(merger, [(loaded[k], s) for k, s in request])
    last = [(loaded[k], s) for k, s in history[-1]]
    assert_bitwise(model, reference_weights(bf16_tiny, last))


def test_set_a_then_b_c_then_a_again_and_empty_restores(pool):
    loaded = {k: read_lora(path) for k, (path, _) in pool.items()}
    model = bf16_tiny()
    base = snapshot(model)
    merger = LoraMerger(model)
    merge(merger, [(loaded["a"], 0.8)])
    once = snapshot(model)
    for _ in range(50):
        merge(merger, [(loaded["b"], 1.3), (loaded["c"], -0.7)])
        merge(merger, [(loaded["a"], 0.8)])
    assert_bitwise(model, once)
    merge(merger, [])
    assert_bitwise(model, base)


def test_fp32_sum_of_many_loras_matches_the_math(pool):
    model = tiny_transformer()
    base = snapshot(model)
    merge(LoraMerger(model), [(read_lora(pool[k][0]), s) for k, s in (("a", 1.0), ("b", -0.5), ("c", 2.0))])
    assert_weights(model, base, [(pool["a"][1], 1.0), (pool["b"][1], -0.5), (pool["c"][1], 2.0)], atol=1e-5)


def test_same_set_does_nothing_and_only_touched_tensors_are_written(pool, monkeypatch):
    lora = read_lora(pool["a"][0])
    model = tiny_transformer()
    merger = LoraMerger(model)
    assert merge(merger, [(lora, 1.0)]) == len(lora.deltas)
    assert merge(merger, [(lora, 1.0)]) == 0
    untouched = model.blocks[0].norm2.weight
    ptr = untouched.data_ptr()
    merge(merger, [(lora, 0.5)])
    assert untouched.data_ptr() == ptr and "blocks.0.norm2.weight" not in merger.pristine


def test_interrupted_write_puts_the_previous_set_back(pool, monkeypatch):
    loaded = {k: read_lora(path) for k, (path, _) in pool.items()}
    model = tiny_transformer()
    merger = LoraMerger(model)
    merge(merger, [(loaded["a"], 1.0)])
    before = snapshot(model)
    calls = {"n": 0}
    original = LoraDelta.row_adder

    def flaky(self, shape, device):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt  # a cancellation in the middle of the swap
        return original(self, shape, device)

    monkeypatch.setattr(LoraDelta, "row_adder", flaky)
    with pytest.raises(KeyboardInterrupt):
        merge(merger, [(loaded["b"], 1.0), (loaded["c"], 1.0)])
    monkeypatch.setattr(LoraDelta, "row_adder", original)
    assert_bitwise(model, before)
    merge(merger, [(loaded["b"], 1.0)])  # and the next request works
    assert_bitwise(model, reference_weights(tiny_transformer, [(loaded["b"], 1.0)]))


# ------------------------------------------------------------------ through the pipeline


def test_a_bad_lora_in_a_request_leaves_the_model_as_it_was(fresh_tiny_pipe, pool, tmp_path):
    pipe = fresh_tiny_pipe
    pipe.set_loras([(pool["a"][0], 1.0)])
    before = snapshot(pipe.transformer)
    big = {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 5120),
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(5120, 4),
    }
    save_file(big, tmp_path / "big.safetensors")
    (tmp_path / "html.safetensors").write_text("<!doctype html><title>Sign in</title>")
    for bad, error in (
        (str(tmp_path / "big.safetensors"), LoraMismatch),
        (str(tmp_path / "html.safetensors"), LoraFormatError),
        (str(tmp_path / "missing.safetensors"), LoraNotFound),
    ):
        with pytest.raises(error):
            pipe.set_loras([(pool["b"][0], 1.0), (bad, 1.0)])
        assert_bitwise(pipe.transformer, before)
        assert [r.ref for r in pipe.active_loras] == [pool["a"][0]]
    with pytest.raises(InvalidInput, match="finite"):
        pipe.set_loras([(pool["b"][0], float("inf"))])


@pytest.mark.slow
def test_generate_with_loras_changes_the_video_and_dropping_them_restores_it(fresh_tiny_pipe, pool):
    pipe = fresh_tiny_pipe
    plain = pipe.generate("a fox", seed=1, **SMALL).frames
    styled = pipe.generate("a fox", seed=1, loras=[(pool["c"][0], 3.0)], **SMALL)
    assert styled.metadata["loras"] == [{"ref": pool["c"][0], "strength": 3.0}]
    assert not np.array_equal(styled.frames, plain)
    assert np.array_equal(pipe.generate("a fox", seed=1, loras=[], **SMALL).frames, plain)


@pytest.mark.slow
def test_strength_schedule_remerges_only_at_phase_boundaries(fresh_tiny_pipe, pool, monkeypatch):
    pipe = fresh_tiny_pipe
    applied = []
    original = LoraMerger.prepare

    def spy(self, loras, warned=None):
        applied.append([s for _, s in loras])
        return original(self, loras, warned)

    monkeypatch.setattr(LoraMerger, "prepare", spy)
    pipe.generate(
        "a fox", seed=1, loras=[(pool["a"][0], [1.0, 0.25]), (pool["b"][0], 0.5)], **{**SMALL, "num_inference_steps": 4}
    )
    # set_loras, the run's start, its second half, and after it the first value again (as outside generate)
    assert applied == [[1.0, 0.5], [1.0, 0.5], [0.25, 0.5], [1.0, 0.5]]
    expected = reference_weights(tiny_transformer, [(read_lora(pool["a"][0]), 1.0), (read_lora(pool["b"][0]), 0.5)])
    assert_bitwise(pipe.transformer, expected)


def test_bf16_single_gemm_rounds_once_from_fp32(tmp_path):
    """The one-GEMM path for bf16 factors on bf16 weights equals round(fp32 math) to one ulp."""
    model = bf16_tiny()
    base = snapshot(model)
    expected = write_lora(tmp_path / "l.safetensors", model, "original", dtype=torch.bfloat16, seed=9)
    merge(LoraMerger(model), [(read_lora(tmp_path / "l.safetensors"), 0.9)])
    for name, delta in expected.items():
        param = dict(model.named_parameters())[name]
        want = (base[name].float() + 0.9 * delta).to(torch.bfloat16)
        ulp = torch.finfo(torch.bfloat16).eps * want.float().abs().clamp_min(1e-30)
        assert ((param.float() - want.float()).abs() <= ulp).all(), name
        assert (param != want).float().mean() < 0.01, name


@pytest.mark.parametrize("path", ["measured", "native", "fp32"])
def test_a_real_shape_bf16_merge_rounds_once_on_every_kernel_path(path, monkeypatch):
    """At Wan2.1 1.3B's width and a typical rank, on whichever GEMM this CPU takes, the merge is the
    float64 sum rounded once, to one ulp: the kernels accumulate in fp32 and differ only in order.

    Where the sum cancels to nearly nothing, one ulp of the tiny result is finer than fp32 can
    resolve its summands; there the error is bounded by fp32's resolution of the summands instead.
    """
    from wanlora.lora import merge as merge_module

    if path != "measured":
        monkeypatch.setattr(merge_module, "native_gemm_is_faster", lambda dtype, device: path == "native")
    generator = torch.Generator().manual_seed(3)
    linear = torch.nn.Linear(1536, 1536, bias=False).requires_grad_(False)
    linear.weight.copy_(torch.randn(1536, 1536, generator=generator) * 0.02)
    linear.to(torch.bfloat16)
    base = linear.weight.clone()
    up = (torch.randn(1536, 32, generator=generator) * 0.05).to(torch.bfloat16)
    down = (torch.randn(32, 1536, generator=generator) * 0.05).to(torch.bfloat16)
    delta, strength = LoraDelta((up, down), 16 / 32), 0.8
    LoraMerger(linear).write({"weight": [Term(delta, strength, "l")]})
    factor = strength * delta.alpha_scale
    want = (base.double() + factor * (up.double() @ down.double())).to(torch.bfloat16)
    summands = base.double().abs() + abs(factor) * (up.double().abs() @ down.double().abs())
    ulps = (linear.weight.view(torch.int16).int() - want.view(torch.int16).int()).abs()  # neighbours differ by 1
    error = (linear.weight.double() - want.double()).abs()
    assert ((ulps <= 1) & (torch.sign(linear.weight) == torch.sign(want)) | (error <= 2**-20 * summands)).all()
    assert (ulps > 0).sum().item() <= 5e-5 * want.numel()


# ------------------------------------------------------------------ all or nothing, for every exception


def lora_with_alpha(path, alpha: torch.Tensor, factor: float = 0.01) -> str:
    """A kohya-style LoRA on one module whose alpha is `alpha` (a float64 1e300, a NaN, ...)."""
    tensors = {
        "lora_unet_blocks_0_self_attn_k.lora_down.weight": torch.full((4, 24), factor),
        "lora_unet_blocks_0_self_attn_k.lora_up.weight": torch.full((24, 4), factor),
        "lora_unet_blocks_0_self_attn_k.alpha": alpha,
    }
    save_file(tensors, path)
    return str(path)


def test_an_overflowing_alpha_is_refused_before_any_write(fresh_tiny_pipe, pool, tmp_path):
    pipe = fresh_tiny_pipe
    pipe.set_loras([(pool["a"][0], 1.0)])
    before = snapshot(pipe.transformer)
    huge = lora_with_alpha(tmp_path / "huge.safetensors", torch.tensor(1e300, dtype=torch.float64))
    with pytest.raises(LoraFormatError, match="would push blocks.0.attn1.to_k.weight beyond what"):
        pipe.set_loras([(pool["b"][0], 1.0), (huge, 1.0)])
    assert_bitwise(pipe.transformer, before)
    assert [r.ref for r in pipe.active_loras] == [pool["a"][0]]
    bf16 = WanLoraPipeline.from_pretrained("tiny", dtype=torch.bfloat16)
    # strengths stay within -10..10, so the alpha makes the weights huge (4e4 * alpha / rank 4 per weight)
    big = lora_with_alpha(tmp_path / "big.safetensors", torch.tensor(4e32), factor=100.0)
    bf16.set_loras([(big, 1.0)])  # 4e36 per weight: large, but bf16 holds it
    merged = snapshot(bf16.transformer)
    bigger = lora_with_alpha(tmp_path / "bigger.safetensors", torch.tensor(4e36), factor=100.0)
    with pytest.raises(LoraFormatError, match="beyond what torch.bfloat16 can hold"):
        bf16.set_loras([(bigger, 1.0)])  # 4e40: the bound cannot vouch, and the exact sum overflows
    assert_bitwise(bf16.transformer, merged)


def test_a_write_that_fails_half_way_through_a_tensor_is_undone_too(pool, monkeypatch):
    from wanlora.lora import merge as merge_module

    loaded = {k: read_lora(path) for k, (path, _) in pool.items()}
    model = tiny_transformer()
    merger = LoraMerger(model)
    merge(merger, [(loaded["a"], 1.0)])
    before = snapshot(model)
    monkeypatch.setattr(merge_module, "CPU_CHUNK_ELEMENTS", 24 * 4)  # several chunks per tensor
    chunks = {"n": 0}
    original = merger._summed_rows

    def failing(name, terms, *where):
        for chunk in original(name, terms, *where):
            chunks["n"] += 1
            if chunks["n"] == 9:  # the third chunk of the third tensor: some rows already written
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            yield chunk

    monkeypatch.setattr(merger, "_summed_rows", failing)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        merge(merger, [(loaded["b"], 1.0), (loaded["c"], 0.5)])
    monkeypatch.setattr(merger, "_summed_rows", original)
    assert_bitwise(model, before)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("lora_unet_blocks_0_self_attn_k.alpha", torch.tensor(float("nan"))),
        ("lora_unet_blocks_0_self_attn_k.lora_up.weight", torch.full((24, 4), float("inf"))),
    ],
)
def test_nan_or_inf_in_a_file_is_refused_by_name(tmp_path, key, value):
    path = lora_with_alpha(tmp_path / "l.safetensors", torch.tensor(2.0))
    from safetensors.torch import load_file

    tensors = load_file(path)
    tensors[key] = value
    save_file(tensors, path)
    with pytest.raises(LoraFormatError, match=f"NaN or infinite values, in: {key}"):
        read_lora(path)


@pytest.mark.parametrize(
    ("down", "up", "alpha", "words"),
    [
        (torch.tensor(1.0), torch.zeros(24, 1), None, r"down factor has shape \[\]"),
        (torch.zeros(0, 24), torch.zeros(24, 0), None, r"up factor has shape \[24, 0\]"),
        (torch.zeros(4, 24), torch.zeros(24, 4), torch.ones(4), r"alpha must be one number, not a \[4\]"),
        (torch.zeros(4, 24), torch.zeros(24, 3), None, r"up factor has shape \[24, 3\], which does not fit .* rank 4"),
        (torch.zeros(4, 24), torch.zeros(24, 4, 2), None, r"up factor has shape \[24, 4, 2\], which does not fit"),
    ],
    ids=["0-dim", "empty", "vector-alpha", "ranks", "up-with-a-kernel"],
)
def test_malformed_factors_are_refused_by_name(tmp_path, down, up, alpha, words):
    tensors = {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": down,
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": up,
    }
    if alpha is not None:
        tensors["diffusion_model.blocks.0.self_attn.q.alpha"] = alpha
    save_file(tensors, tmp_path / "l.safetensors")
    with pytest.raises(LoraFormatError, match=words):
        read_lora(tmp_path / "l.safetensors")


@pytest.mark.parametrize(
    ("key", "shape"),
    [
        ("diffusion_model.blocks.0.ffn.0.diff", (24, 32)),  # the (32, 24) weight's delta, transposed
        ("diffusion_model.blocks.0.ffn.0.diff", (32 * 24,)),  # flattened
        ("diffusion_model.blocks.0.diff_m", (24, 6)),  # the (1, 6, 24) table's, transposed
    ],
    ids=["transposed", "flat", "table-transposed"],
)
def test_a_full_delta_of_the_right_size_but_another_shape_is_refused(pool, tmp_path, key, shape):
    """Only the count of values agrees: merged, they would land scrambled over the weight."""
    model = tiny_transformer()
    merger = LoraMerger(model)
    merge(merger, [(read_lora(pool["a"][0]), 1.0)])
    before = snapshot(model)
    save_file({key: torch.randn(shape) * 0.01}, tmp_path / "l.safetensors")
    with pytest.raises(LoraMismatch, match=r"Shapes differ: blocks\.0\."):
        merge(merger, [(read_lora(pool["a"][0]), 1.0), (read_lora(tmp_path / "l.safetensors"), 1.0)])
    assert_bitwise(model, before)


def test_a_full_delta_with_dimensions_of_one_added_or_dropped_still_merges(tmp_path):
    model = tiny_transformer()
    base = snapshot(model)
    table, bias = torch.randn(6, 24) * 0.01, torch.randn(1, 32) * 0.01
    save_file(
        {"diffusion_model.blocks.0.diff_m": table, "diffusion_model.blocks.0.ffn.0.diff_b": bias},
        tmp_path / "l.safetensors",
    )
    merge(LoraMerger(model), [(read_lora(tmp_path / "l.safetensors"), 1.0)])
    expected = {"blocks.0.scale_shift_table": table[None], "blocks.0.ffn.net.0.proj.bias": bias[0]}
    assert_weights(model, base, [(expected, 1.0)])


def test_an_alpha_of_zero_means_the_rank_as_its_trainers_read_it(tmp_path):
    """kohya's, musubi-tuner's and LyCORIS's modules take alpha 0 as alpha = rank (scale 1); read as 0, the LoRA
    would merge to nothing without a word."""
    model = tiny_transformer()
    base = snapshot(model)
    down, up = torch.randn(4, 24) * 0.1, torch.randn(24, 4) * 0.1
    w1a, w1b, w2a, w2b = (torch.randn(shape) * 0.3 for shape in ((24, 2), (2, 24), (24, 2), (2, 24)))
    tensors = {
        "lora_unet_blocks_0_self_attn_q.lora_down.weight": down,
        "lora_unet_blocks_0_self_attn_q.lora_up.weight": up,
        "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(0.0),
        "lora_unet_blocks_0_cross_attn_k.hada_w1_a": w1a,
        "lora_unet_blocks_0_cross_attn_k.hada_w1_b": w1b,
        "lora_unet_blocks_0_cross_attn_k.hada_w2_a": w2a,
        "lora_unet_blocks_0_cross_attn_k.hada_w2_b": w2b,
        "lora_unet_blocks_0_cross_attn_k.alpha": torch.tensor(0, dtype=torch.int64),
    }
    save_file(tensors, tmp_path / "l.safetensors")
    merge(LoraMerger(model), [(read_lora(tmp_path / "l.safetensors"), 1.0)])
    expected = {"blocks.0.attn1.to_q.weight": up @ down, "blocks.0.attn2.to_k.weight": (w1a @ w1b) * (w2a @ w2b)}
    assert_weights(model, base, [(expected, 1.0)])


def test_an_integer_alpha_is_still_alpha(tmp_path):
    """Wan2.2-Lightning stores alpha as an int64 scalar: dropping it runs the LoRA at rank/alpha times its strength."""
    model = tiny_transformer()
    base = snapshot(model)
    down, up = torch.randn(32, 24) * 0.01, torch.randn(24, 32) * 0.01
    save_file(
        {
            "diffusion_model.blocks.0.self_attn.q.lora_down.weight": down,
            "diffusion_model.blocks.0.self_attn.q.lora_up.weight": up,
            "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(4, dtype=torch.int64),
        },
        tmp_path / "l.safetensors",
    )
    merge(LoraMerger(model), [(read_lora(tmp_path / "l.safetensors"), 1.0)])
    assert_weights(model, base, [({"blocks.0.attn1.to_q.weight": (up @ down) * 4 / 32}, 1.0)])


# ------------------------------------------------------------------ where the merge runs


@pytest.fixture
def two_threads():
    """torch on two threads, as on the smallest machine with a core to spare; put back after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_a_cpu_merge_runs_one_weight_per_core_each_single_threaded(pool, monkeypatch, two_threads):
    """torch's own threading ends every small op at a barrier, and a busy core stalls every barrier
    (benchmarks/lora_swap.py measures it). The merge spreads whole weights over threads, ops single-threaded."""
    import threading

    from wanlora.lora import merge as merge_module
    from wanlora.weights import spread

    monkeypatch.setattr(spread, "MIN_SPREAD_ELEMENTS", 0)  # the tiny model's weights count as work
    loaded = {k: read_lora(path) for k, (path, _) in pool.items()}
    seen = []
    real_write = LoraMerger._write
    together = threading.Barrier(2, timeout=30)  # the first two weights are merged at once, or this breaks

    def watched(self, name, terms):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        if len(seen) <= 2:
            together.wait()
        real_write(self, name, terms)

    monkeypatch.setattr(merge_module.LoraMerger, "_write", watched)
    threads = torch.get_num_threads()
    model = bf16_tiny()
    merge(LoraMerger(model), [(loaded["a"], 0.5), (loaded["c"], -1.0)])
    assert {count for _, count in seen} == {1} and len({name for name, _ in seen}) >= 2
    assert torch.get_num_threads() == threads
    monkeypatch.setattr(spread, "MIN_SPREAD_ELEMENTS", 1 << 60)  # inline, torch's threads: the same bits
    inline = bf16_tiny()
    merge(LoraMerger(inline), [(loaded["a"], 0.5), (loaded["c"], -1.0)])
    assert_bitwise(model, snapshot(inline))


def test_a_write_that_fails_on_one_core_is_undone_on_all(pool, monkeypatch, two_threads):
    from wanlora.lora import merge as merge_module
    from wanlora.weights import spread

    monkeypatch.setattr(spread, "MIN_SPREAD_ELEMENTS", 0)
    loaded = {k: read_lora(path) for k, (path, _) in pool.items()}
    model = tiny_transformer()
    merger = LoraMerger(model)
    merge(merger, [(loaded["a"], 1.0)])
    before = snapshot(model)
    real_write, calls = LoraMerger._write, {"n": 0}

    def failing(self, name, terms):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        real_write(self, name, terms)

    monkeypatch.setattr(merge_module.LoraMerger, "_write", failing)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        merge(merger, [(loaded["b"], 1.0), (loaded["c"], 0.5)])
    assert_bitwise(model, before)


def test_host_weights_merge_on_the_gpu_when_it_has_room_for_the_layer(monkeypatch):
    """offload "model"/"group" keep weights in host memory: their merge runs on the pipeline's GPU, one layer's
    work at a time, where its free memory allows, else on the CPU."""
    linear = torch.nn.Linear(64, 32)
    free = {"bytes": 10**9}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 2 * 10**9))
    merger = LoraMerger(linear, compute=torch.device("cuda", 0))
    assert merger._device_for("weight") == torch.device("cuda", 0)
    free["bytes"] = 3 * 4 * 64 * 32 - 1  # less than the layer's rows in fp32, three times over
    assert merger._device_for("weight") == torch.device("cpu")
    assert LoraMerger(linear)._device_for("weight") == torch.device("cpu")  # no GPU given: where the weight is


def test_memory_the_caching_allocator_holds_unused_counts_as_room_for_a_merge_on_the_gpu(monkeypatch):
    """After a generation PyTorch's caching allocator keeps its activations' blocks reserved: the driver's free
    memory (`mem_get_info`) counts them as taken, yet the merge's allocations reuse them. Judged by the driver
    alone, a host weight would merge on the CPU, at the CPU's speed, beside a GPU with room for it."""
    linear = torch.nn.Linear(64, 32)
    work = 3 * 4 * 64 * 32  # the layer's rows in fp32, three times over
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (work // 2, 24 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 20 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 20 * 2**30 - work)
    merger = LoraMerger(linear, compute=torch.device("cuda", 0))
    assert merger._device_for("weight") == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 20 * 2**30 - work // 4)  # in use
    assert merger._device_for("weight") == torch.device("cpu")
