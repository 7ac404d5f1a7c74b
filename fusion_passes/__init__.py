"""fusion_passes: torch.compile / Inductor passes for MoE and tensor-parallel inference."""

__version__ = "0.1.0"

from . import ops  # noqa: F401  (registers the fusion_passes ops)
