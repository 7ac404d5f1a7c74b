"""A rank that disagrees with its peers, or never calls, gets a clear error within the timeout
instead of a hang or garbage. Needs 2 GPUs; launches its own torchrun (so it must not run under
one):

    pytest tests/test_allreduce_rank_errors.py -q
"""

import os
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
    pytest.mark.skipif("WORLD_SIZE" in os.environ, reason="launches its own torchrun"),
]

WORKER = os.path.join(os.path.dirname(__file__), "allreduce_worker.py")


@pytest.mark.parametrize(
    "mode, message",
    [("disagree", "the peer's call disagrees"), ("absent", "timed out waiting for the peer to arrive")],
)
def test_clear_error_within_the_timeout(mode, message):
    env = dict(
        os.environ, FUSION_PASSES_ALLREDUCE_TIMEOUT_S="5", NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1"
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", WORKER, mode]
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    log = out.stdout + out.stderr
    assert out.returncode != 0, log[-3000:]
    assert "fusion_passes::fused_allreduce_rmsnorm" in log and message in log, log[-3000:]
    assert "finished without error" not in log


def test_every_path_right_in_a_fresh_pair_of_processes():
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", WORKER, "paths"]
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
