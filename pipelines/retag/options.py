"""What a retag run can be told: `RetagOptions`, the one source of its options, defaults and ranges.

The `mumic retag` flags and the keys of a YAML job config are generated from these fields, and a value
from either is checked by the same validation (pydantic), with the same one-line error.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Literal

from pydantic import Field, field_validator
from pydantic.dataclasses import dataclass

from mumic_core.images import DEFAULT_MAX_PIXELS

from ..storage import DEFAULT_MAX_BYTES

RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"

# mumic_core.precision's names, written out here so that `mumic --help` imports no torch (a test checks
# that the two agree)
Precision = Literal["auto", "fp32", "bf16", "int8"]
PRECISION_HELP = (
    "number format of the image tower: fp32, bf16 (autocast) or int8 (dynamic quantisation, CPU only); "
    "the head and text tower stay fp32. auto: bf16 on a GPU, fp32 on a CPU"
)


class RetagError(ValueError):
    """A user-fixable problem with a retag invocation (one line); `code` is the exit status."""

    code = 2


class StagingMismatch(RetagError):
    """The staged rows are not the catalog's rows exactly once: committing would duplicate or lose rows."""

    code = 1


class CommitFailed(RetagError):
    """Writing a run's commit failed (the store refused or cut the connection): nothing half-done is
    visible, and a rerun of the run id finishes or repairs it."""

    code = 1


class TooManyErrors(RetagError):
    """More error rows than `max_error_rate` allows (an outage, expired credentials): nothing committed."""

    code = 1


@dataclass(frozen=True)
class RetagOptions:
    """Everything about a run besides what (catalog, model) and where (output)."""

    run_id: str | None = Field(
        None,
        pattern=RUN_ID_PATTERN,
        description="id of this run (default: new); reuse a crashed run's id to finish it",
    )
    full: bool = Field(False, description="re-tag every image, even those already tagged ok")
    skip_unchanged: bool = Field(
        True,
        description="skip, without downloading it, an image whose size and ETag (S3) or modification time "
        "(local) are those `current` holds from this model; off: every image is read and hashed",
    )
    top_k: int = Field(10, ge=0, description="labels kept per image besides those above threshold")
    batch_size: int = Field(256, ge=1, description="images per model call (and per decode batch)")
    concurrency: int | None = Field(
        None, ge=1, description="inference actors (default: one per GPU, or from the CPU count)"
    )
    gpus: int = Field(
        0,
        ge=0,
        description="GPU inference actors to request even if no GPU node is up yet (autoscaling "
        "clusters); 0: one per GPU present",
    )
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS, ge=1, description="refuse images larger than this (width*height)"
    )
    max_bytes: int = Field(DEFAULT_MAX_BYTES, ge=1, description="refuse image files larger than this")
    run_date: str | None = Field(
        None, description="partition date YYYY-MM-DD (default: today, UTC; a resumed run keeps its own)"
    )
    fetch_threads: int = Field(
        32, ge=1, description="concurrent reads per fetch task (reads in flight: tasks x threads)"
    )
    fetch_concurrency: int | None = Field(
        None, ge=1, description="fetch tasks at once (default: one per CPU infer actor, at least 2; 8 per GPU)"
    )
    fetch_retry_budget_s: float = Field(
        60.0, gt=0, description="seconds one image may take to read, retries of throttling included"
    )
    fetch_cpus: float = Field(0.25, gt=0, description="Ray CPUs per fetch task (I/O-bound: they share cores)")
    actor_cpus: float | None = Field(None, gt=0, description="Ray CPUs reserved per inference actor")
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads per inference actor")
    precision: Precision = Field("auto", description=PRECISION_HELP)
    gpu_wait_s: float = Field(
        600.0,
        gt=0,
        description="seconds to wait for the GPU inference actors to start (a GPU node joining an "
        "autoscaling cluster, the model loading) before the run fails",
    )
    rows_per_part: int = Field(
        100_000, ge=1, description="rows per staged file (the unit of resume)"
    )
    allow_root: list[str] = Field(
        default_factory=list,
        description="local folders a catalog may point into besides its own (default: only the catalog's "
        "folder; anything else, and any file that is not a regular file, is an error row `forbidden`)",
    )
    max_error_rate: float = Field(
        0.5,
        ge=0,
        le=1,
        description="commit nothing when more than this share of the catalog rows are errors "
        "(an outage, not bad images); a rerun re-reads them",
    )
    prune: bool = Field(
        False,
        description="the catalog is complete: remove from `current` the images it no longer lists",
    )
    progress: bool = Field(True, description="a progress line on stderr every few seconds")

    @field_validator("run_date")
    @classmethod
    def _a_real_date(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            ok = len(value) == 10 and dt.date.fromisoformat(value).isoformat() == value
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"want a date YYYY-MM-DD, got {value!r}")
        return value


def new_run_id() -> str:
    return f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
