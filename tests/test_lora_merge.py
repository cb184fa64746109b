"""The merge engine: exact, history-free, all-or-nothing; wired into the pipeline."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from wanlora.errors import InvalidInput, LoraFormatError, LoraMismatch, LoraNotFound
from wanlora.lora.formats import Delta, read_lora
from wanlora.lora.merge import LoraMerger
from wanlora.testing import tiny_transformer, write_lora

from .conftest import SMALL
from .lora_helpers import assert_bitwise, assert_weights, snapshot


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
    LoraMerger(model).apply(loras)
    return snapshot(model)


def bf16_tiny():
    model = tiny_transformer()
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    return model


strengths = st.floats(min_value=-2, max_value=3, allow_nan=False, allow_infinity=False, width=32)
sets = st.lists(st.tuples(st.sampled_from("abc"), strengths), max_size=3, unique_by=lambda x: x[0])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=st.lists(sets, min_size=1, max_size=6))
def test_any_swap_history_gives_bitwise_the_same_weights_as_one_apply(pool, history):
    """bf16 weights: the result depends only on the base and the last set, bit for bit."""
    loaded = {k: read_lora(path) for k, (path, _) in pool.items()}
    model = bf16_tiny()
    merger = LoraMerger(model)
    for request in history:
        merger.apply([(loaded[k], s) for k, s in request])
    last = [(loaded[k], s) for k, s in history[-1]]
    assert_bitwise(model, reference_weights(bf16_tiny, last))


def test_set_a_then_b_c_then_a_again_and_empty_restores(pool):
    loaded = {k: read_lora(path) for k, (path, _) in pool.items()}
    model = bf16_tiny()
    base = snapshot(model)
    merger = LoraMerger(model)
    merger.apply([(loaded["a"], 0.8)])
    once = snapshot(model)
    for _ in range(50):
        merger.apply([(loaded["b"], 1.3), (loaded["c"], -0.7)])
        merger.apply([(loaded["a"], 0.8)])
    assert_bitwise(model, once)
    merger.apply([])
    assert_bitwise(model, base)


def test_fp32_sum_of_many_loras_matches_the_math(pool):
    model = tiny_transformer()
    base = snapshot(model)
    LoraMerger(model).apply([(read_lora(pool[k][0]), s) for k, s in (("a", 1.0), ("b", -0.5), ("c", 2.0))])
    assert_weights(model, base, [(pool["a"][1], 1.0), (pool["b"][1], -0.5), (pool["c"][1], 2.0)], atol=1e-5)


def test_same_set_does_nothing_and_only_touched_tensors_are_written(pool, monkeypatch):
    lora = read_lora(pool["a"][0])
    model = tiny_transformer()
    merger = LoraMerger(model)
    assert merger.apply([(lora, 1.0)]) == len(lora.deltas)
    assert merger.apply([(lora, 1.0)]) == 0
    untouched = model.blocks[0].norm2.weight
    ptr = untouched.data_ptr()
    merger.apply([(lora, 0.5)])
    assert untouched.data_ptr() == ptr and "blocks.0.norm2.weight" not in merger.pristine


def test_interrupted_write_puts_the_previous_set_back(pool, monkeypatch):
    loaded = {k: read_lora(path) for k, (path, _) in pool.items()}
    model = tiny_transformer()
    merger = LoraMerger(model)
    merger.apply([(loaded["a"], 1.0)])
    before = snapshot(model)
    calls = {"n": 0}
    original = Delta.row_adder

    def flaky(self, shape, device):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt  # a cancellation in the middle of the swap
        return original(self, shape, device)

    monkeypatch.setattr(Delta, "row_adder", flaky)
    with pytest.raises(KeyboardInterrupt):
        merger.apply([(loaded["b"], 1.0), (loaded["c"], 1.0)])
    monkeypatch.setattr(Delta, "row_adder", original)
    assert_bitwise(model, before)
    merger.apply([(loaded["b"], 1.0)])  # and the next request works
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


def test_generate_with_loras_changes_the_video_and_dropping_them_restores_it(fresh_tiny_pipe, pool):
    pipe = fresh_tiny_pipe
    plain = pipe.generate("a fox", seed=1, **SMALL).frames
    styled = pipe.generate("a fox", seed=1, loras=[(pool["c"][0], 3.0)], **SMALL)
    assert styled.metadata["loras"] == [{"ref": pool["c"][0], "strength": 3.0}]
    assert not np.array_equal(styled.frames, plain)
    assert np.array_equal(pipe.generate("a fox", seed=1, loras=[], **SMALL).frames, plain)


def test_strength_schedule_remerges_only_at_phase_boundaries(fresh_tiny_pipe, pool, monkeypatch):
    pipe = fresh_tiny_pipe
    applied = []
    original = LoraMerger.prepare

    def spy(self, loras):
        applied.append([s for _, s in loras])
        return original(self, loras)

    monkeypatch.setattr(LoraMerger, "prepare", spy)
    pipe.generate(
        "a fox", seed=1, loras=[(pool["a"][0], [1.0, 0.25]), (pool["b"][0], 0.5)], **{**SMALL, "num_inference_steps": 4}
    )
    assert applied == [[1.0, 0.5], [1.0, 0.5], [0.25, 0.5]]
    expected = reference_weights(tiny_transformer, [(read_lora(pool["a"][0]), 0.25), (read_lora(pool["b"][0]), 0.5)])
    assert_bitwise(pipe.transformer, expected)


def test_bf16_single_gemm_rounds_once_from_fp32(tmp_path):
    """The one-GEMM path for bf16 factors on bf16 weights equals round(fp32 math) to one ulp."""
    model = bf16_tiny()
    base = snapshot(model)
    expected = write_lora(tmp_path / "l.safetensors", model, "original", dtype=torch.bfloat16, seed=9)
    LoraMerger(model).apply([(read_lora(tmp_path / "l.safetensors"), 0.9)])
    for name, delta in expected.items():
        param = dict(model.named_parameters())[name]
        want = (base[name].float() + 0.9 * delta).to(torch.bfloat16)
        ulp = torch.finfo(torch.bfloat16).eps * want.float().abs().clamp_min(1e-30)
        assert ((param.float() - want.float()).abs() <= ulp).all(), name
        assert (param != want).float().mean() < 0.01, name
