"""Batch generation: a jobs file in, one PNG per image and a manifest out, resumable.

Runs ``jobs.jsonl`` (next to this script) on the built-in shapes model, then runs it again to
show that a rerun skips what is done (a killed run finishes the same way). With
``--engine ray`` the rows run on Ray actors (``pip install 'latentkit[ray]'``).

    python examples/batch/run.py --output outputs/batch
    python examples/batch/run.py --output outputs/batch-ray --engine ray --workers 2

The same from the shell: ``latentkit batch examples/batch/jobs.jsonl -o outputs/batch``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from latentkit import batch

JOBS = Path(__file__).with_name("jobs.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description="Generate every row of jobs.jsonl.")
    parser.add_argument("--output", type=Path, default=Path("outputs/batch"))
    parser.add_argument("--engine", choices=batch.ENGINES, default="local")
    parser.add_argument("--workers", type=int, default=None, help="Ray actors")
    parser.add_argument("--steps", type=int, default=None, help="override every row's steps")
    args = parser.parse_args()

    jobs: Path | list[dict[str, object]] = JOBS
    if args.steps is not None:  # rows as Python dicts: ids default to their position
        lines = JOBS.read_text().splitlines()
        jobs = [{**json.loads(line), "steps": args.steps} for line in lines]
    for attempt in ("first", "second"):
        summary = batch.run(
            jobs, output_dir=args.output, engine=args.engine, workers=args.workers, progress=False
        )
        print(
            f"{attempt} run: done {summary.done}, skipped {summary.skipped}, "
            f"failed {summary.failed}, {summary.images} images in {summary.seconds:.1f} s"
        )
    # One manifest line per image: the job (redo it with latentkit.generate(**job)), the seed
    # actually used, the file's sha256.
    first = json.loads(summary.manifest.read_text().splitlines()[0])
    print(f"{first['file']}: seed {first['parameters']['seed']}, sha256 {first['sha256'][:16]}…")


if __name__ == "__main__":
    main()
