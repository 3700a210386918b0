"""Export the stored robust statistics of a run to experiment trackers.

The numbers are the ones the API serves (``service.api.queries.trend`` over the kept
``checkpoint_stat`` rows, the untrusted share of ``service.robust``), logged at each checkpoint's
training step under ``alphawatch/...`` keys. Exporting is idempotent: each tracker is read back
first, and a (key, step) it holds already is never logged again.
"""

from alphawatch.integrations.export.points import (
    Point,
    export_run,
    points_of,
)
from alphawatch.integrations.export.trackers import (
    MlflowTarget,
    Target,
    TensorBoardTarget,
    TrackerRun,
    WandbTarget,
    targets_of,
)

__all__ = [
    "MlflowTarget",
    "Point",
    "Target",
    "TensorBoardTarget",
    "TrackerRun",
    "WandbTarget",
    "export_run",
    "points_of",
    "targets_of",
]
