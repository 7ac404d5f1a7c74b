"""The passes, one module each. Each module has ``NAME`` and
``apply(graph, config) -> int`` (the number of matches it rewrote). They run in the
order of ``config.PASS_NAMES``."""

from . import allreduce_rmsnorm, nan_safe_routing, router_gemm, router_routing, slice_before_allreduce

# slice_before_allreduce must run before allreduce_rmsnorm (it moves the slice that
# sits between the all-reduce and the norm); router_gemm and nan_safe_routing are
# independent of those two, and router_routing fuses only what both of them produced.
PASSES = {
    module.NAME: module
    for module in (slice_before_allreduce, allreduce_rmsnorm, router_gemm, nan_safe_routing, router_routing)
}
