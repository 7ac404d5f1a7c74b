"""The passes, one module each. Each module has ``NAME`` and
``apply(graph, config) -> int`` (the number of matches it rewrote). They run in the
order of ``config.PASS_NAMES``."""

from . import allreduce_rmsnorm, nan_safe_routing, router_gemm, slice_before_allreduce

# slice_before_allreduce must run before allreduce_rmsnorm (it moves the slice that
# sits between the all-reduce and the norm); the router passes are independent.
PASSES = {module.NAME: module for module in (slice_before_allreduce, allreduce_rmsnorm, router_gemm, nan_safe_routing)}
