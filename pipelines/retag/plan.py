"""How a run shares the cluster: actors, CPUs and GPUs per stage, torch threads (Ray logical resources)."""

from __future__ import annotations

from dataclasses import dataclass

from .options import RetagOptions


@dataclass(frozen=True)
class Plan:
    """How the stages share the cluster (Ray logical resources + torch threads)."""

    actors: int
    actor_cpus: float
    actor_gpus: float
    torch_threads: int | None
    decode_cpus: float
    io_cpus: float  # catalog reads and fetch tasks: I/O-bound, several share a core


def plan_resources(resources: dict, opts: RetagOptions) -> Plan:
    """GPU: one actor per GPU, decode in CPU tasks beside it. CPU only: data-parallel actors that decode
    their own batches (decode tasks with the actors' resources are fused into them by Ray Data), so no
    core waits on another stage. One logical CPU stays free for the catalog listing / read / fetch tasks
    (Ray Data's file listing task asks for a whole CPU; with none free the job would never start)."""
    cpus = float(resources.get("CPU", 1))
    gpus = max(int(resources.get("GPU", 0)), opts.gpus)
    io_cpus = opts.fetch_cpus
    if gpus:
        actors = opts.concurrency or gpus
        return Plan(actors, opts.actor_cpus or 1.0, 1.0, opts.torch_threads, 1.0, io_cpus)
    threads = opts.torch_threads or (1 if cpus < 8 else 2)
    actors = opts.concurrency or max(1, int(cpus // threads))
    actor_cpus = opts.actor_cpus or max(0.25, (cpus - 1) / actors)
    return Plan(actors, actor_cpus, 0.0, threads, actor_cpus, io_cpus)
