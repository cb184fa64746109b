"""The targets of wanlora/runtime/patches.py still have the shape the patches assume.

Each check names what moved, so a diffusers or torch upgrade that breaks a patch fails here
first, rather than as a fast mode that never skips or a parallel run that divides by zero.
"""

import inspect

import torch
from diffusers import ModelMixin
from diffusers.hooks import FirstBlockCacheConfig, HookRegistry
from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK, FBCHeadBlockHook

from wanlora.runtime.patches import cpu_counts_as_one_device, first_block_cache_computes_first_steps
from wanlora.tiny import tiny_transformer


def test_first_block_cache_still_decides_through_the_method_we_wrap():
    decide = FBCHeadBlockHook._should_compute_remaining_blocks
    assert list(inspect.signature(decide).parameters) == ["self", "hidden_states_residual"]
    assert "self._should_compute_remaining_blocks(" in inspect.getsource(FBCHeadBlockHook.new_forward)
    assert "self.state_manager" in inspect.getsource(FBCHeadBlockHook.__init__)


def test_the_wrapped_decision_computes_the_first_steps_then_defers_to_diffusers():
    transformer = tiny_transformer()
    transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))  # diffusers alone would skip every step it can
    first_block_cache_computes_first_steps(transformer, 2)
    head = HookRegistry.check_if_exists_or_initialize(transformer.blocks[0]).get_hook(_FBC_LEADER_BLOCK_HOOK)
    residual = torch.ones(1, 4, 8)
    with transformer.cache_context("cond"):
        head.state_manager.get_state().head_block_residual = residual  # a full step has run before
        decisions = [head._should_compute_remaining_blocks(residual) for _ in range(4)]
    assert decisions == [True, True, False, False]
    other = tiny_transformer()
    other.enable_cache(FirstBlockCacheConfig(threshold=1e9))
    other_head = HookRegistry.check_if_exists_or_initialize(other.blocks[0]).get_hook(_FBC_LEADER_BLOCK_HOOK)
    assert "_should_compute_remaining_blocks" not in vars(other_head)  # the class itself is untouched


def test_diffusers_still_places_ranks_by_the_accelerator_count_we_swap():
    caller = inspect.getsource(ModelMixin._resolve_parallel_config)
    assert "rank % torch.accelerator.device_count()" in caller
    assert inspect.signature(torch.accelerator.device_count).parameters == {}


def test_the_count_reads_one_only_on_the_cpu_and_only_inside():
    original = torch.accelerator.device_count
    with cpu_counts_as_one_device(torch.device("cpu")):
        assert torch.accelerator.device_count() == 1
    assert torch.accelerator.device_count is original
    with cpu_counts_as_one_device(torch.device("meta")):
        assert torch.accelerator.device_count is original
