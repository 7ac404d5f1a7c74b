"""fusion_passes: torch.compile / Inductor passes for MoE and tensor-parallel inference.

    compiled = torch.compile(model, backend="fusion_passes")
    compiled(*inputs)
    fusion_passes.last_report().counts
"""

__version__ = "0.1.0"

from . import ops  # noqa: E402,F401  (registers the fusion_passes ops)
from . import fused_allreduce  # noqa: E402,F401  (registers fused_allreduce_rmsnorm's CUDA implementation)
from .backend import Backend, last_report, reset  # noqa: E402
from .config import PASS_NAMES, PassConfig  # noqa: E402
from .manager import PassManager  # noqa: E402
from .report import Report  # noqa: E402

__all__ = ["Backend", "PassConfig", "PassManager", "Report", "PASS_NAMES", "last_report", "reset", "ops"]
