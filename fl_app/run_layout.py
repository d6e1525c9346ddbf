"""Where a run's files are: one object for every path under ``runs/<name>/`` (and the server-side copy).

``runs/<name>/``::

    fl/<job>/checkpoint.pt           the job's per-round checkpoint (fl_app.fl.server.SynthPersistor)
    fl/<job>/global_<job>.pt         the job's global model in synthbrain's format
    job_<job>.json                   the job's settings
    global/                          the assembled global model directory (fl_app.global_model)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["JOBS", "RunLayout", "global_file_name"]

JOBS = ("vqvae", "prior")


def global_file_name(job: str) -> str:
    """``global_<job>.pt``: the file a job's persistor writes into its checkpoint folder."""
    return f"global_{job}.pt"


@dataclass(frozen=True)
class RunLayout:
    """The paths of run ``root`` (``runs/<name>``); :meth:`server` gives a production server's folders."""

    root: Path
    jobs_under: str = "fl"  # the jobs' folders: <root>/fl/<job> (a production server: <root>/<job>)

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def server(cls, run_name: str) -> RunLayout:
        """A production run on the server, relative to the server's workspace (``synthbrain/<run>``)."""
        return cls(Path("synthbrain") / run_name, jobs_under="")

    def job_dir(self, job: str) -> Path:
        return self.root / self.jobs_under / job

    def global_file(self, job: str) -> Path:
        return self.job_dir(job) / global_file_name(job)

    def job_settings(self, job: str) -> Path:
        return self.root / f"job_{job}.json"

    @property
    def global_dir(self) -> Path:
        return self.root / "global"
