"""Driver work handed to a Ray task because its memory grows with the data: table reads, file footers.

The ingest driver's memory stays bounded by the size of a segment, not of the table or of a
source file; reads whose memory grows with either run here, on a worker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
WAITING = 4  # values a streamed task may produce ahead of the driver (Ray's generator backpressure)


def on_worker(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` in a Ray task and return its result: table reads whose memory grows with the table."""
    import ray

    return ray.get(ray.remote(num_cpus=0.25, max_retries=3)(fn).remote(*args, **kwargs))


def stream_on_worker(fn: Callable[..., Iterator[T]], *args: Any, **kwargs: Any) -> Iterator[T]:
    """Yield what the generator ``fn`` yields, run as a Ray streaming task; in this process without Ray.

    The task holds no CPU (it would take one from the workers for the whole run) and produces at
    most ``WAITING`` values ahead of the consumer. Closing the iterator cancels the task.
    """
    import ray

    if not ray.is_initialized():
        yield from fn(*args, **kwargs)
        return
    task = ray.remote(num_cpus=0, max_retries=3, _generator_backpressure_num_objects=WAITING)(fn)
    refs = task.remote(*args, **kwargs)
    try:
        for ref in refs:
            yield ray.get(ref)
    finally:
        ray.cancel(refs)
