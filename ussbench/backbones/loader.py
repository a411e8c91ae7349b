"""Images to network input in batches of one shape: decode and resize ahead of the forward, in dataset order.

A backbone's forward needs a batch of equally sized images. Datasets hold images of a few sizes in any
order, so images stream in dataset order into one bucket per input size; a full bucket is a batch. Memory
stays bounded: when more than ``max_pending`` images wait, the fullest bucket goes out as a shorter batch.
Decoding and resizing run in ``workers`` background threads (PIL and torch release the GIL) while the
caller runs the forward of the previous batch, each on one OpenMP thread; ``workers=0`` prepares every
image in the caller's thread.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch


@dataclass
class Prepared:
    """One image ready for the network: its dataset index, (3, H, W) input and original (height, width)."""

    index: int
    input: torch.Tensor
    image_size: tuple[int, int]


def one_omp_thread() -> None:
    """Make the calling thread's torch ops use one OpenMP thread (the per-thread OpenMP setting), so that a
    decode thread never adds a second team of threads beside the forward's: no oversubscription."""
    torch.get_num_threads()  # torch sets a new thread's OpenMP count on its first use: let it happen first
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(limits=1, user_api="openmp")


def prepared_images(
    n: int, prepare: Callable[[int], Prepared], workers: int = 1, ahead: int = 32
) -> Iterator[Prepared]:
    """``prepare(i)`` for i in 0..n-1, in order; with workers > 0 up to ``ahead`` images are prepared early."""
    if workers <= 0:
        for i in range(n):
            yield prepare(i)
        return
    with ThreadPoolExecutor(
        workers, thread_name_prefix="ussbench-decode", initializer=one_omp_thread
    ) as pool:
        window: deque[Future[Prepared]] = deque()
        next_index = 0
        try:
            while next_index < n or window:
                while next_index < n and len(window) < max(1, ahead):
                    window.append(pool.submit(prepare, next_index))
                    next_index += 1
                yield window.popleft().result()
        finally:
            for future in window:  # the consumer stopped early or a prepare failed: drop queued work
                future.cancel()


def shape_batches(
    items: Iterable[Prepared], batch_size: int, max_pending: int | None = None
) -> Iterator[list[Prepared]]:
    """Group prepared images into batches of one input shape (each batch in dataset order).

    A bucket is emitted when it holds ``batch_size`` images; when more than ``max_pending`` (default
    2 x batch_size) images wait in all buckets, the fullest bucket is emitted early; the rest at the end.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    limit = 2 * batch_size if max_pending is None else max(batch_size, max_pending)
    buckets: dict[tuple[int, ...], list[Prepared]] = {}
    pending = 0
    for item in items:
        shape = tuple(item.input.shape)
        bucket = buckets.setdefault(shape, [])
        bucket.append(item)
        pending += 1
        if len(bucket) >= batch_size:
            pending -= len(bucket)
            yield buckets.pop(shape)
        elif pending > limit:
            fullest = max(buckets, key=lambda s: len(buckets[s]))
            pending -= len(buckets[fullest])
            yield buckets.pop(fullest)
    yield from buckets.values()
