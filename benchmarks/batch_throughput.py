"""Images per second of ``latentkit.batch`` on the built-in shapes model (64x64, its default
20 steps): the local engine with 1, 4 and 8 rows per ``generate`` call, and the Ray engine
with 1 and 2 actors (one CPU and one torch thread each) on a one-node cluster started once.

    OMP_NUM_THREADS=1 python benchmarks/batch_throughput.py --rows 32 --repeats 3

Two numbers per run: end to end (``batch.run``'s wall time, which includes loading the model
and, for Ray, starting the actors) and steady (the images after the first call's, divided by
the time between the first call's last PNG and the last PNG written).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the cluster on loopback

from latentkit import batch

PROMPTS = [
    "a red circle left of a blue square",
    "a green triangle above a yellow circle",
    "a blue square",
    "a purple triangle right of a red square",
]


def one_run(rows: int, **options: object) -> tuple[float, float]:
    jobs = [{"prompt": PROMPTS[i % len(PROMPTS)]} for i in range(rows)]
    with tempfile.TemporaryDirectory() as folder:
        summary = batch.run(jobs, output_dir=folder, progress=False, **options)  # type: ignore[arg-type]
        assert summary.done == rows and summary.failed == 0
        times = sorted(p.stat().st_mtime for p in Path(folder).glob("*.png"))
    first = int(options.get("batch_size", 1))  # type: ignore[call-overload]
    return rows / summary.seconds, (rows - first) / (times[-1] - times[first - 1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    configs: list[tuple[str, dict[str, object]]] = [
        ("local, 1 row per call", {}),
        ("local, 4 rows per call", {"batch_size": 4}),
        ("local, 8 rows per call", {"batch_size": 8}),
    ]
    if not args.skip_ray:
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
        configs += [
            ("ray, 1 worker", {"engine": "ray", "workers": 1}),
            ("ray, 2 workers", {"engine": "ray", "workers": 2}),
        ]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in configs}
    for _ in range(args.repeats):  # interleaved, so a busy moment hits every config
        for name, options in configs:
            results[name].append(one_run(args.rows, **options))
    print(
        "| configuration | end to end img/s (min / median / max) | steady img/s (min / median / max) |"
    )
    print("|---|---|---|")
    for name, runs in results.items():
        ends, steadies = [r[0] for r in runs], [r[1] for r in runs]
        print(
            f"| {name} | {min(ends):.2f} / {statistics.median(ends):.2f} / {max(ends):.2f} "
            f"| {min(steadies):.2f} / {statistics.median(steadies):.2f} / {max(steadies):.2f} |"
        )


if __name__ == "__main__":
    main()
