"""The CUDA all-reduce runtime's decisions that need no GPU: which path a size takes, and the
settings' validation. (The kernels themselves: tests/test_multigpu_allreduce_rmsnorm.py.)"""

import pytest
import torch

import fusion_passes
from fusion_passes import fused_allreduce
from fusion_passes.fused_allreduce import NCCL, ONE_SHOT, TWO_SHOT, Workspace, choose_algorithm


def workspace(max_tokens=512):
    half_bytes = 2 * max_tokens * fused_allreduce.WORKSPACE_ROW_BYTES
    return Workspace(buffer=None, handle=None, counters=None, half_bytes=half_bytes)


def x(tokens, hidden=2880, dtype=torch.bfloat16):
    return torch.empty(tokens, hidden, dtype=dtype, device="meta")


@pytest.mark.parametrize("tokens, path", [(1, ONE_SHOT), (128, ONE_SHOT), (1092, ONE_SHOT), (1093, NCCL), (8192, NCCL)])
def test_two_ranks_size_picks_the_path(tokens, path):
    # 2880 bf16 = 5760 bytes a row; on 2 GPUs one-shot up to 6 MiB, then NCCL (measured).
    assert choose_algorithm(x(tokens), world_size=2, ws=workspace(max_tokens=1024)) == path


@pytest.mark.parametrize("tokens, path", [(1, ONE_SHOT), (45, ONE_SHOT), (46, TWO_SHOT), (364, TWO_SHOT), (365, NCCL)])
def test_more_ranks_use_two_shot_in_between(tokens, path):
    assert choose_algorithm(x(tokens), world_size=4, ws=workspace()) == path


def test_without_a_workspace_or_with_unaligned_rows_nccl_serves():
    assert choose_algorithm(x(1), world_size=2, ws=None) == NCCL
    assert choose_algorithm(x(1, hidden=36), world_size=2, ws=workspace()) == NCCL  # 72-byte rows
    assert choose_algorithm(x(1), world_size=1, ws=workspace()) == NCCL


def test_a_small_workspace_bounds_the_symmetric_paths():
    tiny = workspace(max_tokens=4)  # 4 x 16 KiB x 2 regions a half
    assert choose_algorithm(x(16), world_size=4, ws=tiny) == ONE_SHOT  # 92 KB fits one region
    assert choose_algorithm(x(32), world_size=4, ws=tiny) == NCCL  # 184 KB fits neither


def test_max_tokens_is_validated_and_keys_the_cache():
    with pytest.raises(ValueError, match="allreduce_max_tokens"):
        fusion_passes.PassConfig(allreduce_max_tokens=0)
    with pytest.raises(ValueError, match="max_tokens"):
        fused_allreduce.set_max_tokens(0)
    assert fusion_passes.PassConfig(allreduce_max_tokens=64).cache_key() != fusion_passes.PassConfig().cache_key()
