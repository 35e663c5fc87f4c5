"""Batch runner shared by ``medvol preprocess`` and ``medvol embed``: one job per input volume.

Contract (what a radiology lab needs from a folder job):

- every job ends as ``ok``, ``failed`` (one-line reason naming the file) or ``skipped`` (outputs already
  there: resume) in a CSV manifest that is rewritten atomically after every job, so a killed run leaves a
  valid manifest and no half-written output;
- the manifest records every output's size and SHA-256; a resumed run skips a job only when its outputs still
  match them (or, with no record, when the processor's ``verify(job)`` reads them back completely), and redoes
  it otherwise, so a truncated or replaced output is never trusted;
- bad input never stops the run: a processor's exception fails only its job; with ``workers > 1`` even a
  crashing worker process (e.g. a segfault in a native reader) only fails the job that crashed it;
- ``workers`` processes in parallel (spawned processes, torch/ITK threads split between them);
- under ``torchrun`` each rank takes every WORLD_SIZE-th job, writes a shard manifest, and rank 0 merges
  them into the final manifest (gloo process group, so it works on CPU).

A *processor* is a picklable callable ``processor(job) -> dict`` that writes ``job.outputs`` atomically and
returns extra manifest fields; its optional ``describe(job) -> dict`` fills the row of a skipped job and its
optional ``verify(job)`` raises when an existing output cannot be read back (default: ``describe``).

With ``MEDVOL_DEBUG=1`` in the environment (``medvol --debug``) the traceback of every failed job is printed to
stderr as well; the manifest keeps the one-line reason.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from medvol.errors import DEBUG_ENV, DataError, find_error, one_line
from medvol.io.atomic import remove_stale_temps
from medvol.io.manifest import Manifest, check_outputs, output_checksums, read_manifest

__all__ = ["Job", "BatchResult", "run_batch", "dist_context", "set_worker_threads", "is_inside"]

@dataclass
class Job:
    """One input: ``source`` (manifest key), ``item`` (datalist entry) and its output paths by column name."""

    source: str
    item: dict
    outputs: dict[str, Path] = field(default_factory=dict)
    error: str | None = None  # a job can be failed before it runs (e.g. output name collision)

    def done(self) -> bool:
        return bool(self.outputs) and all(Path(p).is_file() for p in self.outputs.values())


@dataclass
class BatchResult:
    manifest: Path
    counts: dict[str, int]

    @property
    def exit_code(self) -> int:
        return 1 if self.counts.get("failed", 0) else 0


def set_worker_threads(threads: int) -> None:
    """Pin torch, ITK and BLAS threads of this process (deterministic results, no oversubscription)."""
    import SimpleITK as sitk
    import torch

    threads = max(1, int(threads))
    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)


def is_inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """True when ``path`` (normalised, symbolic links not followed) lies below ``root``."""
    path, root = os.path.abspath(path), os.path.abspath(root)
    return path != root and os.path.commonpath([path, root]) == root


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _run_job(processor, job: Job) -> dict:
    """Run one job; never raises: the outcome is a manifest row."""
    start = time.perf_counter()
    row = {"source": job.source, **{k: str(v) for k, v in job.outputs.items()}}
    try:
        for out in job.outputs.values():
            remove_stale_temps(out)
        row.update(processor(job) or {})
        row.update(output_checksums(job.outputs))  # what a resumed run checks before it skips this job
        row["status"] = "ok"
    except Exception as e:  # any failure of one input must not stop the batch
        if _debug():
            print(f"medvol: traceback of {job.source}:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        data_error = find_error(e, DataError)  # MONAI's Compose wraps it in a RuntimeError
        if data_error is not None:
            row.update(status="failed", error=str(data_error))
        else:
            root = e
            while root.__cause__ is not None:
                root = root.__cause__
            if isinstance(root, OSError) and root.filename:  # e.g. an output folder that is not writable
                error = f"{job.source}: cannot write or read {root.filename}: {root.strerror or one_line(root)}"
            else:
                error = f"{job.source}: {type(root).__name__}: {one_line(root)}"
            row.update(status="failed", error=error)
    row["seconds"] = time.perf_counter() - start
    return row


def _resume_check(processor, job: Job, previous: dict | None) -> tuple[str | None, dict]:
    """(why the existing outputs of ``job`` cannot be trusted or None, their checksum fields)."""
    try:
        reason = check_outputs(job.outputs, previous)
        if reason is None:
            return None, {k: v for k, v in previous.items() if k.endswith(("_bytes", "_sha256"))}
        if reason != "unrecorded":
            return reason, {}
        verify = getattr(processor, "verify", None) or getattr(processor, "describe", None)
        if verify is not None:
            verify(job)  # no size/hash on record: the output must at least read back completely
        return None, output_checksums(job.outputs)
    except Exception as e:  # noqa: BLE001 - an unreadable output is redone, whatever the reader raised
        err = find_error(e, DataError) or e
        return one_line(err), {}


def _skipped_row(processor, job: Job, previous: dict | None, checksums: dict) -> dict:
    row = {"source": job.source, "status": "skipped", **{k: str(v) for k, v in job.outputs.items()}, "seconds": 0.0,
           **checksums}
    if previous and previous.get("note"):  # e.g. "gantry tilt ... resampled": still true of the output
        row["note"] = previous["note"]
    describe = getattr(processor, "describe", None)
    try:
        row.update(describe(job) if describe else {})
    except Exception:  # noqa: BLE001 - verified but not describable: keep what the previous manifest said
        for key in ("shape", "spacing"):
            if previous and previous.get(key):
                row[key] = previous[key]
    return row


def dist_context() -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _init_dist(world: int):
    import torch.distributed as dist

    if world > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group(backend="gloo")
        return dist
    return dist if world > 1 and dist.is_initialized() else None


def run_batch(
    jobs: list[Job],
    processor,
    manifest_path: str | os.PathLike,
    workers: int = 1,
    overwrite: bool = False,
    desc: str = "medvol",
    threads: int | None = None,
) -> BatchResult:
    """Run ``processor`` over ``jobs`` with resume, parallel workers, torchrun sharding and a manifest.

    Args:
        jobs: one per input, in the order rows should appear in the manifest.
        processor: picklable ``processor(job) -> dict`` (see module docstring).
        manifest_path: the final CSV (``OUTPUT/manifest.csv``).
        workers: parallel processes on this machine (1 = in this process).
        overwrite: redo jobs whose outputs exist instead of skipping them.
        desc: progress bar label.
        threads: torch/ITK threads per worker; default splits the CPU cores between workers.

    Returns:
        BatchResult with the manifest path and the counts per status (merged across ranks under torchrun).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    manifest_path = Path(manifest_path)
    remove_stale_temps(manifest_path)  # a killed run can leave its manifest's temp file (and skip every job)
    rank, world = dist_context()
    dist = _init_dist(world)
    order = [j.source for j in jobs]
    mine = jobs[rank::world]
    shard_path = manifest_path if world == 1 else manifest_path.with_name(f".{manifest_path.stem}.rank{rank}.csv")
    manifest = Manifest(shard_path, order=order)
    previous = read_manifest(manifest_path)
    threads = threads or max(1, (os.cpu_count() or 1) // (workers * world))

    todo: list[Job] = []
    for job in mine:
        if job.error:
            manifest.add({"source": job.source, "status": "failed", "error": job.error, "seconds": 0.0,
                          **{k: str(v) for k, v in job.outputs.items()}})
        elif job.done() and not overwrite:
            reason, checksums = _resume_check(processor, job, previous.get(job.source))
            if reason is None:
                manifest.add(_skipped_row(processor, job, previous.get(job.source), checksums))
            else:
                print(f"resume: {job.source}: existing output not trusted ({reason}); redoing it", file=sys.stderr)
                todo.append(job)
        else:
            todo.append(job)
    manifest.write()

    label = desc if world == 1 else f"{desc} [rank {rank}]"
    with tqdm(total=len(mine), initial=len(mine) - len(todo), desc=label, unit="vol", file=sys.stderr,
              dynamic_ncols=True, position=rank if world > 1 else None) as bar:
        def record(row):
            manifest.add(row)
            manifest.write()
            bar.update(1)
            if row["status"] == "failed":
                bar.write(f"failed: {row['error']}", file=sys.stderr)

        if workers == 1:
            set_worker_threads(threads)
            for job in todo:
                record(_run_job(processor, job))
        else:
            _run_pool(processor, todo, workers, threads, record)

    counts = manifest.counts()
    if dist is not None:
        counts = _merge_shards(dist, rank, world, manifest_path, order, counts)
    return BatchResult(manifest_path, counts)


def _run_pool(processor, todo: list[Job], workers: int, threads: int, record) -> None:
    """Process ``todo`` in a spawned pool; jobs lost to a crashed worker are retried alone, then failed."""
    ctx = mp.get_context("spawn")
    crashed: list[Job] = []
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=set_worker_threads, initargs=(threads,)) as pool:
        futures = {pool.submit(_run_job, processor, job): job for job in todo}
        for fut in as_completed(futures):
            try:
                record(fut.result())
            except BrokenProcessPool:
                crashed.append(futures[fut])
    for job in crashed:  # one at a time, so a crash is attributed to the job that caused it
        with ProcessPoolExecutor(1, mp_context=ctx, initializer=set_worker_threads, initargs=(threads,)) as pool:
            try:
                record(pool.submit(_run_job, processor, job).result())
            except BrokenProcessPool:
                record({"source": job.source, "status": "failed", "seconds": 0.0,
                        "error": f"{job.source}: worker process crashed while processing this input"})


def _merge_shards(dist, rank: int, world: int, manifest_path: Path, order: list[str], counts: dict) -> dict:
    import torch

    dist.barrier()
    if rank == 0:
        merged = Manifest(manifest_path, order=order)
        for r in range(world):
            shard = manifest_path.with_name(f".{manifest_path.stem}.rank{r}.csv")
            for row in read_manifest(shard).values():
                merged.add(row)
        merged.write()
        for r in range(world):
            manifest_path.with_name(f".{manifest_path.stem}.rank{r}.csv").unlink(missing_ok=True)
    totals = torch.tensor([counts.get(k, 0) for k in ("ok", "failed", "skipped")], dtype=torch.long)
    dist.all_reduce(totals)
    dist.barrier()
    return dict(zip(("ok", "failed", "skipped"), totals.tolist()))
