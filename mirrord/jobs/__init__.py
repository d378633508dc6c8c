"""One module per job. The registry maps config sections to job classes, imported on demand."""

from __future__ import annotations

from importlib import import_module

from mirrord.jobs.base import Job

# Run order within a pass: mirror Fragalysis first (experiments), then discover datasets (linked to
# experiments), then deposit, then annotate Design Hub.
JOBS = {
    "fragalysis": "mirrord.jobs.fragalysis:FragalysisJob",
    "ispyb": "mirrord.jobs.ispyb:IspybJob",
    "pdis": "mirrord.jobs.deposit:DepositJob",
    "designhub": "mirrord.jobs.designhub:DesignHubJob",
}


def job_class(name: str) -> type[Job]:
    module, _, attr = JOBS[name].partition(":")
    return getattr(import_module(module), attr)
