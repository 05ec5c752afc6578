"""Running a `megaolmo.data.prepare` job's shard tasks, in this process or over a pool of worker processes.

The pool's processes are spawned and never outlive the run: any exception, or SIGTERM / SIGINT (turned into
`PrepareInterrupted` so that clean-up runs), terminates them at once instead of after their current shard.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager

from megaolmo.data.tokenize_shard import (
    ShardTask,
    available_cores,
    init_worker,
    run_shard_task,
    set_tokenizer_threads,
)
from megaolmo.errors import DataError


class PrepareInterrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived; the workers are stopped and only committed shards remain."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.message = signal.Signals(signum).name


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """Turn SIGTERM (what Slurm sends at a time limit) and SIGINT into `PrepareInterrupted` in the main thread,
    so the clean-up that stops the workers runs; the first signal counts, repeats wait for that clean-up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False

    def interrupt(signum: int, _frame: object) -> None:
        nonlocal fired
        if not fired:
            fired = True
            raise PrepareInterrupted(signum)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Terminate the workers now (not after their current shard), then wait for them to be gone."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # no public list before Python 3.14
    for process in processes:
        process.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
            process.join()


def run_tasks(
    tasks: list[ShardTask], workers: int, threads: int | None
) -> Iterator[tuple[ShardTask, dict | DataError]]:
    """(task, record or the DataError that failed it) for every task, as each finishes.

    One worker (or one task) runs in this process (`threads`, when given, sizes its tokenizer pool if this
    process has not encoded anything yet); more run in a pool of spawned processes, terminated on any
    exception or signal, so no worker outlives the run.
    """
    if workers == 1 or len(tasks) == 1:
        if threads is not None:
            set_tokenizer_threads(threads)
        for task in tasks:
            try:
                yield task, run_shard_task(task)
            except DataError as err:
                yield task, err
        return
    pool_size = min(workers, len(tasks))
    per_worker = threads if threads is not None else max(1, available_cores() // pool_size)
    # spawn, not fork: a forked child of a process that already ran tokenizers' thread pool runs single-threaded
    pool = ProcessPoolExecutor(
        max_workers=pool_size,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_worker,
        initargs=(per_worker,),
    )
    try:
        futures = {pool.submit(run_shard_task, task): task for task in tasks}
        for future in as_completed(futures):
            try:
                yield futures[future], future.result()
            except DataError as err:
                yield futures[future], err
            except BrokenProcessPool:
                raise DataError(
                    "a worker process died (killed by the system, out of memory?); committed shards are kept, "
                    "run the same command again to resume (fewer --workers if memory is short)"
                ) from None
    except BaseException:
        _stop_pool(pool)
        raise
    pool.shutdown(wait=True)
