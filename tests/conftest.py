import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """`cuda` tests skip cleanly without a GPU; `multigpu` ones also need 2+ GPUs."""
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    few_gpus = pytest.mark.skip(reason="needs 2+ CUDA GPUs under torchrun")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "multigpu" in item.keywords and (torch.cuda.device_count() < 2 or "WORLD_SIZE" not in os.environ):
            item.add_marker(few_gpus)


@pytest.fixture(scope="session")
def nccl_group():
    """The NCCL world group of a torchrun launch (`multigpu` tests), one GPU per rank."""
    import torch.distributed as dist

    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        dist.init_process_group("nccl")
    return dist.group.WORLD
