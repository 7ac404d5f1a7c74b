"""A rank that disagrees with its peers, or never calls, gets a clear error within the timeout
instead of a hang or garbage. Needs 2 GPUs; launches its own torchrun (so it must not run under
one):

    pytest tests/test_allreduce_rank_errors.py -q
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
    pytest.mark.skipif("WORLD_SIZE" in os.environ, reason="launches its own torchrun"),
]

WORKER = textwrap.dedent(
    """
    import os, sys
    import torch, torch.distributed as dist
    from fusion_passes import fused_allreduce, kernels

    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    assert kernels.load(), kernels.load_error()
    rank, name = dist.get_rank(), dist.group.WORLD.group_name
    weight = torch.ones(2880, dtype=torch.bfloat16, device="cuda")
    fused_allreduce.workspace(name, weight.device)
    tokens = 4
    if sys.argv[1] == "disagree" and rank == 1:
        tokens = 5  # the same path (one-shot), another shape
    if sys.argv[1] == "absent" and rank == 1:
        dist.barrier()  # never calls the op; waits for rank 0, which fails
    else:
        x = torch.randn(tokens, 2880, dtype=torch.bfloat16, device="cuda")
        fused_allreduce.fused_allreduce_rmsnorm_cuda(x, None, weight, 1e-5, name)
        torch.cuda.synchronize()
    print("finished without error")
    """
)


@pytest.mark.parametrize(
    "mode, message",
    [("disagree", "the peer's call disagrees"), ("absent", "timed out waiting for the peer to arrive")],
)
def test_clear_error_within_the_timeout(tmp_path, mode, message):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(
        os.environ, FUSION_PASSES_ALLREDUCE_TIMEOUT_S="5", NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1"
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script), mode]
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    log = out.stdout + out.stderr
    assert out.returncode != 0, log[-3000:]
    assert "fusion_passes::fused_allreduce_rmsnorm" in log and message in log, log[-3000:]
    assert "finished without error" not in log
