"""Batch generation with the local engine: each image equals ``generate(**row)`` exactly, seeds
derive from the run seed and the id, reruns skip what is done and redo what is missing or
broken, bad rows fail alone, a killed run finishes by running it again.

Runs on the built-in shapes model (64x64) with 2-3 steps; the Ray engine is in
test_batch_ray.py."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import latentkit
from latentkit import batch
from latentkit.batch.jobs import MAX_SHARED_PROMPT_BYTES, accepted_keys, plan, read_rows, units
from latentkit.batch.output import exclusive, sha256
from latentkit.errors import InvalidArgumentError, LatentkitError

ROOT = Path(__file__).resolve().parents[1]
MODEL = "latentkit/shapes"

ROWS: list[dict[str, Any]] = [
    {"id": "circle", "prompt": "a red circle left of a blue square", "steps": 3, "seed": 7},
    {"prompt": "a green triangle", "steps": 2},  # id 2, derived seed
    {"id": "pair", "prompt": "a blue square", "steps": 2, "seed": 11, "num_images": 2},
    {"prompt": "a yellow circle", "steps": 2, "scheduler": "ddim", "guidance_scale": 4.0},
    {"prompt": "a purple square", "steps": 2, "negative_prompt": "a circle", "height": 32},
]


def write_jobs(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def records(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def done_records(folder: Path) -> list[dict[str, Any]]:
    return [r for r in records(folder) if r["status"] == "done"]


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread here, as in the command-line runs compared with this process's images
    (OMP_NUM_THREADS=1): on a CPU another thread count can move a pixel by one level."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe() -> Any:
    return latentkit.load_pipeline(MODEL, device="cpu", progress=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, batch.BatchSummary]:
    """One uninterrupted run of ROWS, shared by the tests that compare against it."""
    folder = tmp_path_factory.mktemp("reference")
    jobs = write_jobs(folder / "jobs.jsonl", ROWS)
    summary = batch.run(jobs, output_dir=folder / "out", progress=False)
    return folder / "out", summary


def test_each_image_is_exactly_generate_of_its_row(
    reference: tuple[Path, batch.BatchSummary], pipe: Any
) -> None:
    out, summary = reference
    assert (summary.done, summary.skipped, summary.failed, summary.images) == (5, 0, 0, 6)
    done = done_records(out)
    assert sorted(r["file"] for r in done) == sorted(
        ["circle.png", "2.png", "pair-0.png", "pair-1.png", "4.png", "5.png"]
    )
    assert sorted(p.name for p in out.glob("*.png")) == sorted(r["file"] for r in done)
    for record in done:
        job = dict(record["job"])
        assert job.pop("model") == MODEL
        expected = pipe.generate(**job, progress=False)
        k = record["index"]
        data = (out / record["file"]).read_bytes()
        assert record["sha256"] == sha256(data)
        # Tolerance 0: the same call on the same model gives the same pixels.
        assert np.array_equal(pixels(data), np.asarray(expected.images[k]))
        params = expected.parameters[k]
        assert record["parameters"] == json.loads(json.dumps(dataclasses.asdict(params)))
        with Image.open(out / record["file"]) as image:
            assert image.text["parameters"] == params.a1111()
        assert record["status"] == "done" and record["error"] is None and record["seconds"] > 0
    # The one-call API gives the same image for a manifest job (model included).
    first = next(r for r in done if r["id"] == "circle")
    again = latentkit.generate(**first["job"], device="cpu", progress=False)
    assert np.array_equal(pixels((out / "circle.png").read_bytes()), np.asarray(again.images[0]))


def test_rows_without_seed_derive_it_from_run_seed_and_id(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [{"id": "x", "prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}]
    jobs = plan(read_rows(rows), model=MODEL, run_seed=5)
    assert [j.keywords["seed"] for j in jobs] == [
        batch.derived_seed(5, "x"),
        batch.derived_seed(5, "2"),
        batch.derived_seed(5, "3"),
    ]
    seeds = [j.keywords["seed"] for j in jobs]
    assert len(set(seeds)) == 3 and all(0 <= s < 2**32 for s in seeds)
    # Independent of position: the same id keeps its seed when rows move.
    moved = plan(read_rows([{"prompt": "z"}, rows[0]]), model=MODEL, run_seed=5)
    assert moved[1].keywords["seed"] == seeds[0]
    # Another run seed, other seeds; a given seed is kept as it is.
    assert plan(read_rows(rows), model=MODEL, run_seed=6)[0].keywords["seed"] != seeds[0]
    assert plan(read_rows([{"prompt": "a", "seed": 3}]), model=MODEL, run_seed=5)[0].keywords[
        "seed"
    ] == (3)


def test_rerun_skips_done_rows_and_redoes_missing_broken_or_changed(
    reference: tuple[Path, batch.BatchSummary], tmp_path: Path
) -> None:
    ref, _ = reference
    jobs = write_jobs(tmp_path / "jobs.jsonl", ROWS)
    out = tmp_path / "out"
    first = batch.run(jobs, output_dir=out, progress=False)
    assert first.done == 5
    expected = {p.name: p.read_bytes() for p in ref.glob("*.png")}
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == expected

    again = batch.run(jobs, output_dir=out, progress=False)
    assert (again.done, again.skipped, again.failed, again.images) == (0, 5, 0, 0)
    assert len(done_records(out)) == 6  # nothing written twice

    (out / "2.png").unlink()  # missing
    (out / "pair-1.png").write_bytes(expected["pair-1.png"][:100])  # cut short
    changed = [*ROWS[:3], {**ROWS[3], "prompt": "a yellow triangle"}, ROWS[4]]
    write_jobs(jobs, changed)  # row 4 asks for another image
    third = batch.run(jobs, output_dir=out, progress=False)
    assert (third.done, third.skipped, third.failed, third.images) == (3, 2, 0, 4)
    now = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert now["2.png"] == expected["2.png"] and now["pair-1.png"] == expected["pair-1.png"]
    assert now["pair-0.png"] == expected["pair-0.png"]  # redone with its row, same bytes
    assert now["4.png"] != expected["4.png"]
    latest = {r["file"]: r for r in done_records(out)}
    assert latest["4.png"]["job"]["prompt"] == "a yellow triangle"
    assert all(latest[name]["sha256"] == sha256(data) for name, data in now.items())


def test_bad_rows_fail_alone_with_their_message(tmp_path: Path) -> None:
    rows = [
        {"id": "ok", "prompt": "a red circle", "steps": 2},
        "{not json",
        {"prompt": "x", "bogus": 1},
        {"prompt": "x", "steps": 0},  # generate's typed error
        {"id": "ok", "prompt": "again"},  # duplicate id
        {"id": "../up", "prompt": "x"},
        {"id": "ab", "prompt": "x", "num_images": 2, "steps": 2},
        {"id": "ab-1", "prompt": "x"},  # would write ab's second file
        {"prompt": "x", "prompt_embeds": [[0.0]]},
        {"prompt": "x", "image": "missing.png", "steps": 2},
        {"prompt": "x", "model": str(tmp_path / "no-such-model")},
        [1, 2],
    ]
    jobs = write_jobs(tmp_path / "jobs.jsonl", rows)
    summary = batch.run(jobs, output_dir=tmp_path / "out", progress=False)
    assert (summary.done, summary.failed) == (2, 10)
    failed = {r["line"]: r["error"] for r in records(tmp_path / "out") if r["status"] == "failed"}
    assert failed.keys() == {2, 3, 4, 5, 6, 8, 9, 10, 11, 12}
    assert "invalid JSON" in failed[2]
    assert "unknown key(s) 'bogus'" in failed[3] and "negative_prompt" in failed[3]
    assert failed[4].startswith("InvalidArgumentError: steps must be an int")
    assert failed[5] == "duplicate id 'ok'"
    assert "cannot name a file" in failed[6]
    assert failed[8] == "duplicate file of id 'ab'"
    assert "prompt_embeds" in failed[9] and "tensors" in failed[9]
    assert "InvalidArgumentError" in failed[10] and str(tmp_path / "missing.png") in failed[10]
    assert "no-such-model" in failed[11]
    assert "not an object" in failed[12]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
        "ab-0.png",
        "ab-1.png",
        "ok.png",
    ]


def test_accepted_keys_are_generates_keywords() -> None:
    import inspect

    params = set(inspect.signature(latentkit.generate).parameters)
    keys = accepted_keys()
    assert {
        "prompt",
        "negative_prompt",
        "seed",
        "steps",
        "scheduler",
        "image",
        "num_images",
    } <= keys
    assert {"id", "model"} <= keys
    run_level = {"device", "dtype", "performance", "callback", "progress", "output_type"}
    assert not keys & run_level and not keys & {"prompt_embeds", "negative_prompt_embeds"}
    assert keys - {"id", "model"} <= params | keys  # nothing invented


def test_csv_jobs_give_the_same_images_as_json_lines(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "prompt": "a red circle, big", "seed": 3, "steps": 2, "guidance_scale": 3.5},
        {"id": "b", "prompt": "a blue square", "steps": 2},
    ]
    jsonl = write_jobs(tmp_path / "jobs.jsonl", rows)
    csv_path = tmp_path / "jobs.csv"
    csv_path.write_text(
        'id,prompt,seed,steps,guidance_scale\na,"a red circle, big",3,2,3.5\nb,a blue square,,2,\n'
    )
    batch.run(jsonl, output_dir=tmp_path / "json", progress=False)
    batch.run(csv_path, output_dir=tmp_path / "csv", progress=False)
    for name in ("a.png", "b.png"):
        assert (tmp_path / "json" / name).read_bytes() == (tmp_path / "csv" / name).read_bytes()
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,steps\nx,two\n")
    summary = batch.run(bad, output_dir=tmp_path / "bad", progress=False)
    assert summary.failed == 1
    assert "column 'steps' must be an int" in records(tmp_path / "bad")[0]["error"]
    (tmp_path / "noprompt.csv").write_text("text\nx\n")
    with pytest.raises(InvalidArgumentError, match="'prompt' column"):
        batch.run(tmp_path / "noprompt.csv", output_dir=tmp_path / "np", progress=False)


def test_image_paths_are_relative_to_the_jobs_file(tmp_path: Path, pipe: Any) -> None:
    (tmp_path / "inputs").mkdir()
    start = Image.fromarray(np.indices((64, 64)).sum(0).astype(np.uint8) * 2).convert("RGB")
    start.save(tmp_path / "inputs" / "start.png")
    row = {"id": "i", "prompt": "a red circle", "image": "inputs/start.png", "steps": 3}
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{**row, "strength": 0.5}])
    summary = batch.run(jobs, output_dir=tmp_path / "out", progress=False)
    assert summary.done == 1
    (record,) = done_records(tmp_path / "out")
    assert record["job"]["image"] == str(tmp_path / "inputs" / "start.png")
    job = {k: v for k, v in record["job"].items() if k != "model"}
    expected = pipe.generate(**job, progress=False).images[0]
    assert np.array_equal(pixels((tmp_path / "out" / "i.png").read_bytes()), np.asarray(expected))


def test_batching_rows_groups_only_rows_that_share_every_setting(tmp_path: Path) -> None:
    long_prompt = "x" * (MAX_SHARED_PROMPT_BYTES + 1)
    rows = [
        {"prompt": "a", "steps": 2},
        {"prompt": "b", "steps": 2},
        {"prompt": "c", "steps": 3},  # other steps
        {"prompt": "d", "steps": 2},
        {"prompt": long_prompt, "steps": 2},  # could pad the others' text: alone
        {"prompt": "e", "steps": 2, "num_images": 2},  # one generator for two images: alone
        {"prompt": "f", "steps": 2, "model": "other"},  # another model
        {"prompt": "g", "steps": 2},
        {"prompt": "h", "steps": 3},
    ]
    jobs = plan(read_rows(rows), model=MODEL, run_seed=0)
    grouped = [[j.id for j in u.jobs] for u in units(jobs, batch_size=3)]
    assert grouped == [["1", "2", "4"], ["3", "9"], ["5"], ["6"], ["8"], ["7"]]
    assert [[j.id for j in u.jobs] for u in units(jobs, batch_size=1)] == [
        [str(i)] for i in (1, 2, 3, 4, 5, 6, 8, 9, 7)
    ]


def test_batched_rows_are_one_generate_call_and_stay_fixed_on_rerun(
    tmp_path: Path, pipe: Any
) -> None:
    rows = [{"prompt": p, "steps": 2} for p in ("a red circle", "a blue square", "a triangle")]
    jobs = write_jobs(tmp_path / "jobs.jsonl", rows)
    out = tmp_path / "out"
    summary = batch.run(jobs, output_dir=out, batch_size=4, progress=False)
    assert summary.done == 3
    done = sorted(done_records(out), key=lambda r: r["line"])
    expected = pipe.generate(
        [r["job"]["prompt"] for r in done],
        seed=[r["job"]["seed"] for r in done],
        steps=2,
        progress=False,
    )
    for record, image, params in zip(done, expected.images, expected.parameters, strict=True):
        assert np.array_equal(pixels((out / record["file"]).read_bytes()), np.asarray(image))
        assert record["parameters"] == json.loads(json.dumps(dataclasses.asdict(params)))
    # The group is formed from the whole file: the missing image is redone in the same call.
    before = (out / "2.png").read_bytes()
    (out / "2.png").unlink()
    again = batch.run(jobs, output_dir=out, batch_size=4, progress=False)
    assert (again.done, again.skipped) == (1, 2)
    assert (out / "2.png").read_bytes() == before


def test_run_checks_its_arguments_before_work(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"prompt": "a"}])
    for kwargs, message in (
        ({"engine": "spark"}, "engine must be one of"),
        ({"workers": 2}, "local engine has one worker"),
        ({"workers": 0, "engine": "ray"}, "workers must be an int"),
        ({"batch_size": 0}, "batch_size must be"),
        ({"max_retries": -1}, "max_retries must be"),
        ({"ray_address": "auto"}, "ray_address needs engine='ray'"),
        ({"seed": 1.5}, "seed must be an int"),
    ):
        with pytest.raises(InvalidArgumentError, match=message):
            batch.run(jobs, output_dir=tmp_path / "out", progress=False, **kwargs)
    with pytest.raises(InvalidArgumentError, match="no jobs file"):
        batch.run(tmp_path / "missing.jsonl", output_dir=tmp_path / "out", progress=False)
    with pytest.raises(InvalidArgumentError, match=r"\.jsonl or \.csv"):
        batch.run(tmp_path / "jobs.txt", output_dir=tmp_path / "out", progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(InvalidArgumentError, match="is a file"):
        batch.run(jobs, output_dir=tmp_path / "file", progress=False)
    assert not (tmp_path / "out").exists()


def test_one_run_at_a_time_and_stale_temporary_files_go(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"id": "a", "prompt": "a", "steps": 2}])
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".a.png.12345.tmp"  # what a run killed between write and rename leaves
    stale.write_bytes(b"partial")
    with exclusive(out), pytest.raises(LatentkitError, match="another batch run"):
        batch.run(jobs, output_dir=out, progress=False)
    assert batch.run(jobs, output_dir=out, progress=False).done == 1
    assert not stale.exists() and sorted(p.name for p in out.iterdir() if p.suffix != ".lock") == [
        "a.png",
        "manifest.jsonl",
    ]


def test_manifest_cut_mid_line_is_repaired(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"id": "a", "prompt": "a", "steps": 2}])
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.jsonl").write_text('{"id": "a", "file": "a.png", "sta')  # killed mid-write
    assert batch.run(jobs, output_dir=out, progress=False).done == 1
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert lines[0].endswith('"sta') and json.loads(lines[1])["status"] == "done"
    assert batch.run(jobs, output_dir=out, progress=False).skipped == 1


def cli(*args: str) -> subprocess.Popen[str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "latentkit", "batch", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_cli_killed_mid_run_finishes_on_rerun(
    reference: tuple[Path, batch.BatchSummary], tmp_path: Path
) -> None:
    ref, _ = reference
    rows = [*ROWS, *({"prompt": f"a red circle number {i}", "steps": 3} for i in range(6))]
    jobs = write_jobs(tmp_path / "jobs.jsonl", rows)
    out = tmp_path / "out"
    proc = cli(str(jobs), "-o", str(out), "--quiet")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        manifest = out / "manifest.jsonl"
        if manifest.is_file() and manifest.read_text().count('"done"') >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)  # no cleanup, no flush
    proc.wait()
    partial = Counter(r["file"] for r in done_records(out))
    assert 2 <= sum(partial.values()) < 12

    proc = cli(str(jobs), "-o", str(out), "--quiet")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert stderr == ""  # --quiet: no progress bar
    match = re.match(r"done (\d+), skipped (\d+), failed 0 ", stdout)
    assert match is not None, stdout
    done, skipped = int(match[1]), int(match[2])
    assert done + skipped == 11 and skipped >= 1  # rows: 5 from ROWS and 6 more
    files = Counter(r["file"] for r in done_records(out))
    # Every image once: 6 from ROWS (pair has two) and 6 more, none written twice.
    assert len(files) == 12 and set(files.values()) == {1}
    assert sorted(p.name for p in out.glob("*.png")) == sorted(files)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    for record in done_records(out):
        data = (out / record["file"]).read_bytes()
        assert sha256(data) == record["sha256"]
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    for name in ("circle.png", "2.png", "pair-0.png", "pair-1.png", "4.png", "5.png"):
        assert (out / name).read_bytes() == (ref / name).read_bytes()


def test_cli_exit_status_says_some_rows_failed(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"prompt": "a", "steps": 2}, {"steps": "x"}])
    proc = cli(str(jobs), "-o", str(tmp_path / "out"))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert "done 1, skipped 0, failed 1" in stdout
    assert "img/s" in stderr or "s/img" in stderr  # the progress bar
    proc = cli(str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "out2"))
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "no jobs file" in stderr


def test_example_runs(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "examples/batch/run.py", "--output", str(tmp_path), "--steps", "2"],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    rows = (ROOT / "examples" / "batch" / "jobs.jsonl").read_text().splitlines()
    assert {r["id"] for r in lines} == {
        str(json.loads(r).get("id", i + 1)) for i, r in enumerate(rows)
    }
    assert "second run: done 0" in proc.stdout
    for record in lines:
        with Image.open(tmp_path / record["file"]) as image:
            assert image.text["parameters"].startswith(record["parameters"]["prompt"])
