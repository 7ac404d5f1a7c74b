"""Shared test helpers: compile with the passes and capture the rewritten graph."""

from __future__ import annotations

import contextlib
import datetime
import socket

import torch
import torch.distributed as dist
from torch._inductor import config as inductor_config

import fusion_passes
from fusion_passes.testing import render_region


class GraphCapture:
    """A user post-grad pass that keeps the graphs it sees (after fusion_passes ran,
    since the backend chains an already-installed pass after its own)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph):
        self.graphs.append(graph)

    def uuid(self):
        return None  # capturing must not be served from the cache


def compile_and_run(module, *inputs, config=None, dynamic_dim0=True, codegen=True):
    """(backend, compiled output, captured post-pass graphs) for ``module(*inputs)``."""
    torch._dynamo.reset()
    backend = fusion_passes.Backend(config or fusion_passes.PassConfig(), codegen=codegen)
    capture = GraphCapture()
    for t in inputs:
        if dynamic_dim0 and isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] > 1:
            torch._dynamo.mark_dynamic(t, 0)
    with inductor_config.patch(post_grad_custom_post_pass=capture), torch.no_grad():
        out = torch.compile(module, backend=backend)(*inputs)
    return backend, out, capture.graphs


def region(graphs, *targets) -> str:
    return "\n\n".join(render_region(g, targets) for g in graphs)


def free_port() -> int:
    """A free TCP port on the loopback interface, for a test's process group."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def gloo_process_group(rank: int, world_size: int, port: int, timeout_s: int = 120):
    """This process's membership of a real gloo group on the loopback interface."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in fp32."""
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()
