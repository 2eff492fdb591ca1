"""The Ray Data pipeline of a run: snapshot rows → fetch → decode → infer → staged parts (written by the
workers), as a stream of part records: no tag row reaches the driver."""

from __future__ import annotations

import functools
import math
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from .. import storage
from . import catalog as catalog_mod
from . import decode, fetch, staging
from .options import RetagError, RetagOptions

if TYPE_CHECKING:
    # a type only: plan.py imports torch, which the read tasks that import this module must not
    from .plan import Plan

# The line a creation-task traceback ends with for our own typed errors (DeviceError, ModelError, ...).
_RAISED = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?(?P<kind>\w*Error): (?P<message>.+)$", re.MULTILINE)
_OURS = ("DeviceError", "ModelError", "ImageError", "StorageError")


@ray.remote(num_cpus=0, max_restarts=0)
class Tally:
    """One per pipeline attempt: the inference actors count their batches here (fire and forget), which
    the driver reads for its progress lines and first-output time. Nothing waits on it: a worker whose
    driver died is never blocked here."""

    def __init__(self):
        self.rows, self.first_at, self.ready_at = 0, None, []

    def ready(self) -> None:
        """An inference actor has loaded its model (a restarted one tells again, later)."""
        self.ready_at.append(time.time())

    def add(self, rows: int) -> None:
        if self.first_at is None:
            self.first_at = time.time()
        self.rows += rows

    def read(self) -> tuple[int, float | None]:
        """(rows inferred so far, wall-clock time of the first batch)."""
        return self.rows, self.first_at

    def ready_times(self) -> list[float]:
        """Wall-clock times at which inference actors had loaded their models, in order."""
        return list(self.ready_at)


def tally_name(run_id: str) -> str:
    """The Ray actor name of a run's tally (one writer per run id: the lease)."""
    return f"mumic-retag-tally:{run_id}"


@dataclass(frozen=True)
class PartSpec:
    """Where and how the pipeline's workers stage its parts."""

    staging: staging.RunStaging
    run_date: str
    constants: dict[str, str]  # model_name, model_version, taxonomy_sha256, run_id
    rows_per_part: int
    seq_base: int = 0  # the pipeline's parts are numbered above it (`staging.part_seq`)
    max_part_bytes: int = staging.MAX_PART_BYTES


class SnapshotDatasource(Datasource):
    """The run's catalog snapshot: one read task per Parquet row group, one block per batch.

    Not read_parquet: its file-listing task and footer-reading actors cost seconds and hundreds of MB per
    run, and a whole snapshot file would arrive as one block (no parallelism downstream).
    """

    def __init__(self, files: list[str], block_rows: int):
        super().__init__()
        self.groups = catalog_mod.row_groups(files)
        self.schema = catalog_mod.snapshot_schema(files)  # the catalog's columns, and `expect` when split
        self.block_rows = block_rows

    def estimate_inmemory_data_size(self) -> int:
        return sum(rows for _, _, rows in self.groups) * 120

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        return [
            ReadTask(
                functools.partial(catalog_mod.read_row_group, file, index, self.block_rows),
                BlockMetadata(num_rows=rows, size_bytes=rows * 120, exec_stats=None, input_files=None),
                schema=self.schema,
            )
            for file, index, rows in self.groups
        ]


class PredictorStage:
    """The inference stage as Ray Data builds it: `infer.Predictor`, imported in the actor. The driver and
    the read tasks unpickle this module; importing `infer` here would load torch (and open_clip) in each of
    them, 1.5 s of CPU and ~250 MB apiece, for a class only the actors run."""

    def __init__(self, **kwargs):
        from .infer import Predictor  # torch and open_clip: in the actor only

        self.predictor = Predictor(**kwargs)

    def __call__(self, batch):
        return self.predictor(batch)


def actor_pool_size(plan: Plan, num_rows: int, batch_size: int) -> int:
    """Inference actors the pipeline starts: the plan's, but no more than there are batches (an actor
    without a batch would only pay its start-up: torch, the model)."""
    return min(plan.actors, max(1, math.ceil(num_rows / batch_size)))


def build_dataset(
    files: list[str],
    num_rows: int,
    model_uri: str,
    config: dict,
    known_ref,
    opts: RetagOptions,
    plan: Plan,
    roots: tuple[str, ...] | None,
    parts: PartSpec,
    tally,
):
    """The Ray Data pipeline over a catalog snapshot; yields its staged parts' records (PART_SCHEMA)."""
    prep = config["preprocessing"]
    image_size = int(prep["image_size"])
    blocks = max(1, math.ceil(num_rows / opts.batch_size))
    # one block per batch (Ray splits each read task's output): many small blocks let fetch, decode and
    # infer run in parallel from the first seconds, and results stream back to the driver
    # one read task at a time: a row group reads in milliseconds, and every extra concurrent task is
    # another worker process to start
    ds = ray.data.read_datasource(
        SnapshotDatasource(files, opts.batch_size),
        num_cpus=plan.io_cpus,
        override_num_blocks=blocks,
        compute=ray.data.TaskPoolStrategy(size=1),
    )
    ds = ds.map_batches(
        fetch.fetch_batch,
        batch_format="pyarrow",
        batch_size=opts.batch_size,
        fn_kwargs={
            "options": fetch.FetchOptions(
                threads=opts.fetch_threads,
                max_bytes=opts.max_bytes,
                retry=storage.RetryPolicy(budget_s=opts.fetch_retry_budget_s),
                roots=roots,
            )
        },
        num_cpus=plan.io_cpus,
        # bounded: at most fetch_concurrency * fetch_threads requests in flight against the object store
        compute=ray.data.TaskPoolStrategy(size=min(blocks, plan.fetch_tasks)),
    )
    ds = ds.map_batches(
        decode.decode_batch,
        batch_format="pyarrow",
        batch_size=opts.batch_size,
        fn_kwargs={
            "image_size": image_size,
            "max_pixels": opts.max_pixels,
            "resize_mode": prep.get("resize_mode", "shortest"),
            "known": known_ref,
        },
        num_cpus=plan.decode_cpus,
    )
    ds = ds.map_batches(
        PredictorStage,
        batch_format="pyarrow",
        batch_size=opts.batch_size,
        fn_constructor_kwargs={
            "model_uri": model_uri,
            "top_k": opts.top_k,
            "device": plan.device,
            "num_threads": plan.torch_threads,
            "precision": plan.precision,
            "tally": tally,
        },
        compute=ray.data.ActorPoolStrategy(size=actor_pool_size(plan, num_rows, opts.batch_size)),
        num_cpus=plan.actor_cpus,
        num_gpus=plan.actor_gpus or None,
    )
    ds = _staged(ds, parts, plan)
    if plan.uses_gpu:
        # Ray Data waits forever by default for actors it cannot place (no GPU node ever joins); this
        # dataset's own copy of the context, so nothing else in the process changes
        ds.context.wait_for_min_actors_s = math.ceil(opts.gpu_wait_s)
    return ds


def _staged(ds, parts: PartSpec, plan: Plan):
    """The last stages: rows regrouped into blocks of exactly rows_per_part (the last one fewer), each
    staged by a task (light: I/O and compression), which returns only the parts' records."""
    ds = ds.repartition(target_num_rows_per_block=parts.rows_per_part, strict=True)
    return ds.map_batches(
        staging.write_parts,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={
            "staging": parts.staging,
            "run_date": parts.run_date,
            "constants": parts.constants,
            "rows_per_part": parts.rows_per_part,
            "max_part_bytes": parts.max_part_bytes,
            "seq_base": parts.seq_base,
        },
        num_cpus=plan.io_cpus,
    )


def startup_failure(error: BaseException, plan: Plan, opts: RetagOptions) -> RetagError | None:
    """The pipeline's start failing for a reason a user can act on, as a one-line RetagError: GPU actors
    not placed within --gpu-wait-s, or an inference actor whose device or model could not be set up
    (DeviceError: a GPU reserved, CUDA unusable). None for anything else, which crashes loudly."""
    if isinstance(error, ray.exceptions.GetTimeoutError) and plan.uses_gpu:
        return RetagError(
            f"{plan.actors} GPU inference actor(s) did not start within --gpu-wait-s {opts.gpu_wait_s:g}: "
            "no node with a free GPU joined the cluster (or the model took that long to load)"
        )
    if isinstance(error, ray.exceptions.ActorDiedError) and error.actor_init_failed:
        ours = [m for m in _RAISED.finditer(str(error)) if m["kind"] in _OURS]
        if ours:
            return RetagError(f"an inference actor failed to start: {ours[-1]['message'].strip()}")
    return None
