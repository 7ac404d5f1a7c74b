"""One rank of a 2-GPU run of fusion_passes' fused all-reduce, launched by torchrun (or by hand,
one rank under compute-sanitizer). Modes:

    paths     every path on a few shapes, checked against the peers' sum; exits 0 when right
    disagree  rank 1 calls with another token count than rank 0
    absent    rank 1 never calls
"""

import os
import sys

import torch
import torch.distributed as dist

from fusion_passes import fused_allreduce, kernels
from fusion_passes.ops import rmsnorm_reference


def check_paths(name: str) -> None:
    rank = dist.get_rank()
    for tokens, hidden in [(1, 2880), (7, 64), (130, 4096)]:
        x = torch.randn(
            tokens, hidden, dtype=torch.bfloat16, device="cuda", generator=torch.Generator("cuda").manual_seed(rank)
        )
        residual = torch.ones_like(x)
        weight = torch.ones(hidden, dtype=torch.bfloat16, device="cuda")
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        hidden_want = sum(p.float() for p in parts).to(x.dtype) + residual
        for algorithm in fused_allreduce.ALGORITHMS:
            out, residual_out = fused_allreduce.fused_allreduce_rmsnorm_cuda(x, residual, weight, 1e-5, name, algorithm)
            assert torch.equal(residual_out, hidden_want), (tokens, hidden, algorithm)
            torch.testing.assert_close(out, rmsnorm_reference(hidden_want, weight, 1e-5), rtol=2**-7, atol=2**-7)


def main(mode: str) -> None:
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    assert kernels.load(), kernels.load_error()
    rank, name = dist.get_rank(), dist.group.WORLD.group_name
    weight = torch.ones(2880, dtype=torch.bfloat16, device="cuda")
    fused_allreduce.workspace(name, weight.device)
    if mode == "paths":
        check_paths(name)
    elif mode == "absent" and rank == 1:
        dist.barrier()  # never calls the op; waits for rank 0, which fails
    else:
        tokens = 5 if (mode == "disagree" and rank == 1) else 4  # the same path, another shape
        x = torch.randn(tokens, 2880, dtype=torch.bfloat16, device="cuda")
        fused_allreduce.fused_allreduce_rmsnorm_cuda(x, None, weight, 1e-5, name)
    torch.cuda.synchronize()
    print(f"rank {rank}: finished without error", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
