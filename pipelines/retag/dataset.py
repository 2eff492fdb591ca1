"""The Ray Data pipeline of a run: snapshot rows → fetch → decode → infer, as a stream of tag rows."""

from __future__ import annotations

import functools
import math

import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from .. import storage
from . import catalog as catalog_mod
from . import decode, fetch
from .infer import Predictor
from .options import RetagOptions
from .plan import Plan


class SnapshotDatasource(Datasource):
    """The run's catalog snapshot: one read task per Parquet row group, one block per batch.

    Not read_parquet: its file-listing task and footer-reading actors cost seconds and hundreds of MB per
    run, and a whole snapshot file would arrive as one block (no parallelism downstream).
    """

    def __init__(self, files: list[str], block_rows: int):
        super().__init__()
        self.groups = catalog_mod.row_groups(files)
        self.block_rows = block_rows

    def estimate_inmemory_data_size(self) -> int:
        return sum(rows for _, _, rows in self.groups) * 120

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        return [
            ReadTask(
                functools.partial(catalog_mod.read_row_group, file, index, self.block_rows),
                BlockMetadata(num_rows=rows, size_bytes=rows * 120, exec_stats=None, input_files=None),
                schema=catalog_mod.CATALOG_SCHEMA,
            )
            for file, index, rows in self.groups
        ]


def build_dataset(
    files: list[str],
    num_rows: int,
    model_uri: str,
    config: dict,
    known_ref,
    opts: RetagOptions,
    plan: Plan,
    roots: tuple[str, ...] | None,
):
    """The Ray Data pipeline over a catalog snapshot; yields tag rows as pyarrow tables."""
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
        compute=ray.data.TaskPoolStrategy(size=min(blocks, opts.fetch_concurrency or max(2, plan.actors))),
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
    return ds.map_batches(
        Predictor,
        batch_format="pyarrow",
        batch_size=opts.batch_size,
        fn_constructor_kwargs={
            "model_uri": model_uri,
            "top_k": opts.top_k,
            "num_threads": plan.torch_threads,
        },
        compute=ray.data.ActorPoolStrategy(size=min(plan.actors, blocks)),  # no idle actors on small runs
        num_cpus=plan.actor_cpus,
        num_gpus=plan.actor_gpus or None,
    )
