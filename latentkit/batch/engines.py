"""Engines: where units run. Both yield each unit's outcomes to the driver as they finish.

``local`` runs units one after another in this process. ``ray`` runs them on Ray actors, one
pipeline per actor and one unit at a time each: Ray restarts an actor whose process or machine
dies and runs the unit it held again, up to ``max_retries`` times (``max_restarts=-1``,
``max_task_retries``); the driver only hands the next unit to whichever actor is free, and
after a death waits until Ray reports the replacement ready.
"""

from __future__ import annotations

import collections
import logging
import sys
from collections.abc import Generator, Sequence
from typing import Any

from latentkit.batch.jobs import Unit
from latentkit.batch.worker import Outcome, Worker
from latentkit.errors import InvalidArgumentError


def run_local(
    units: Sequence[Unit], *, device: str, dtype: str
) -> Generator[tuple[Unit, list[Outcome]], None, None]:
    worker = Worker(device=device, dtype=dtype)
    for unit in units:
        yield unit, worker.run(unit)


class BatchWorker:
    """The Ray actor: a `Worker` in its own process, its threads limited to its CPUs."""

    def __init__(self, *, device: str, dtype: str, threads: int | None) -> None:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        self.worker = Worker(device=device, dtype=dtype)

    def run(self, unit: Unit) -> list[Outcome]:
        return self.worker.run(unit)

    def ready(self) -> bool:
        """Answers once the actor runs (after a restart, too)."""
        return True


def import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise InvalidArgumentError("engine='ray' needs Ray: pip install 'latentkit[ray]'") from e
    return ray


def run_ray(
    units: Sequence[Unit],
    *,
    workers: int | None,
    address: str | None,
    device: str,
    dtype: str,
    max_retries: int,
    cpus_per_worker: int,
) -> Generator[tuple[Unit, list[Outcome]], None, None]:
    """Run ``units`` on ``workers`` Ray actors (default: one per GPU of the cluster, else one
    per ``cpus_per_worker`` CPUs). Joins ``address`` ("auto": the cluster this machine belongs
    to), the Ray session this process already has, or else starts a local one-node cluster on
    127.0.0.1 for this run."""
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
        if address is None:
            # "local": never join some other cluster this machine happens to know about.
            ray.init(
                address="local",
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                **quiet,
            )
        else:
            ray.init(address=address, **quiet)
        started = True
    actors: list[Any] = []
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        cpus = int(resources.get("CPU", 0))
        if workers is None:
            workers = max(1, gpus or cpus // cpus_per_worker)
        need = workers if gpus else workers * cpus_per_worker
        have = gpus if gpus else cpus
        if need > have:
            message = (
                f"{workers} workers need {need} {'GPUs' if gpus else 'CPUs'}; the Ray cluster "
                f"has {have}"
            )
            if started and address is None:
                raise InvalidArgumentError(message + ": pass a smaller --workers")
            # An autoscaling cluster may add nodes; say why the run could wait.
            print(f"latentkit: warning: {message}; some workers wait for nodes", file=sys.stderr)
        options: dict[str, Any] = {
            "num_cpus": cpus_per_worker,
            "num_gpus": 1 if gpus else 0,
            # Ray replaces a dead actor (any number of times) and runs the unit it held again,
            # at most max_retries times; the pipeline reloads in the new process.
            "max_restarts": -1,
            "max_task_retries": max_retries,
            "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(cpus_per_worker)}},
        }
        actor_class = ray.remote(BatchWorker).options(**options)
        threads = None if gpus else cpus_per_worker
        actors = [
            actor_class.remote(device=device, dtype=dtype, threads=threads) for _ in range(workers)
        ]
        pending = collections.deque(units)
        running: dict[Any, tuple[int, Unit]] = {}  # object ref -> (actor, unit)
        probing: dict[Any, int] = {}  # object ref of a readiness call -> actor

        def submit(index: int) -> None:
            if pending:
                unit = pending.popleft()
                running[actors[index].run.remote(unit)] = (index, unit)

        for index in range(len(actors)):
            submit(index)
        while running or probing:
            (ref,), _ = ray.wait([*running, *probing], num_returns=1)
            if ref in probing:
                index = probing.pop(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError:
                    continue  # gone for good (cannot be placed again): the others go on
                submit(index)
                continue
            index, unit = running.pop(ref)
            try:
                outcomes: list[Outcome] = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                # Ray ran the unit max_retries more times on replaced workers and gave up.
                error = (
                    f"the worker died {max_retries + 1} times running this row ({type(e).__name__})"
                )
                outcomes = [Outcome(job.id, (), error, 0.0) for job in unit.jobs]
                # Wait until Ray has replaced the worker before giving it another row: sent to
                # a worker still restarting, a row would fail without running.
                probing[actors[index].ready.options(max_task_retries=-1).remote()] = index
            except ray.exceptions.RayError as e:
                error = f"{type(e).__name__}: {e}"
                outcomes = [Outcome(job.id, (), error, 0.0) for job in unit.jobs]
                submit(index)
            else:
                submit(index)
            yield unit, outcomes
        for unit in pending:  # only if every worker is gone for good
            error = "no Ray worker is left to run this row"
            yield unit, [Outcome(job.id, (), error, 0.0) for job in unit.jobs]
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()
