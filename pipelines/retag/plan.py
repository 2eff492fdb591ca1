"""How a run shares the cluster: actors, CPUs and GPUs per stage, torch threads (Ray logical resources),
fetch concurrency, and the device every inference actor is told to use."""

from __future__ import annotations

from dataclasses import dataclass

from mumic_core import model_config

from .options import RetagOptions

# Fetch tasks per GPU actor: a GPU actor takes ~3 000 images/s, so at 50 ms a GET it needs 150 reads in
# flight, and ~5 cores of S3-client CPU (~1.5-2.5 ms a GET, one interpreter lock per task: a task tops out
# at ~500 GETs/s whatever its threads). 8 tasks x 32 threads (the default) = 256 in flight, each task at
# ~2/3 of a core; measured in tests/benchmarks/RESULTS-fetch.md.
FETCH_TASKS_PER_GPU = 8


@dataclass(frozen=True)
class Plan:
    """How the stages share the cluster (Ray logical resources + torch threads)."""

    actors: int
    actor_cpus: float
    actor_gpus: float
    torch_threads: int | None
    decode_cpus: float
    io_cpus: float  # catalog reads and fetch tasks: I/O-bound, several share a core
    fetch_tasks: int  # fetch tasks at once: reads in flight = fetch_tasks * fetch_threads
    # "cuda" or "cpu", passed to each actor: Ray 2.60 no longer hides GPUs from actors that reserved
    # none, so an actor left to choose would put every CPU actor of a GPU node on cuda:0, unreserved
    device: str
    precision: str  # resolved for `device` by the one rule (mumic_core.precision): what every actor runs

    @property
    def uses_gpu(self) -> bool:
        return self.actor_gpus > 0


def plan_resources(resources: dict, opts: RetagOptions) -> Plan:
    """GPU: one actor per GPU, decode in CPU tasks beside it (every CPU the actors leave), torch on one
    thread in the actor (the GPU does the maths; more threads only take cores from decode). CPU only:
    data-parallel actors that decode their own batches (decode tasks with the actors' resources are fused
    into them by Ray Data), so no core waits on another stage. One logical CPU stays free for the catalog
    listing / read / fetch tasks (Ray Data's file listing task asks for a whole CPU; with none free the
    job would never start)."""
    cpus = float(resources.get("CPU", 1))
    gpus = max(int(resources.get("GPU", 0)), opts.gpus)
    io_cpus = opts.fetch_cpus
    if gpus:
        actors = opts.concurrency or gpus
        actor_cpus = opts.actor_cpus or 1.0
        threads = opts.torch_threads or max(1, int(actor_cpus))
        fetch_tasks = opts.fetch_concurrency or FETCH_TASKS_PER_GPU * actors
        return Plan(actors, actor_cpus, 1.0, threads, 1.0, io_cpus, fetch_tasks, "cuda", _precision(opts, "cuda"))
    threads = opts.torch_threads or (1 if cpus < 8 else 2)
    actors = opts.concurrency or max(1, int(cpus // threads))
    actor_cpus = opts.actor_cpus or max(0.25, (cpus - 1) / actors)
    fetch_tasks = opts.fetch_concurrency or max(2, actors)
    return Plan(actors, actor_cpus, 0.0, threads, actor_cpus, io_cpus, fetch_tasks, "cpu", _precision(opts, "cpu"))


def _precision(opts: RetagOptions, device: str) -> str:
    """Resolved in the driver, so a combination that cannot work (int8 on a GPU) fails before any actor
    starts, and the run's log names what the actors run."""
    return model_config.resolve(opts.precision, device)
