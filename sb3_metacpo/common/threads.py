"""numpy's BLAS threads while the algorithms run (``BLAS_THREADS``).

The algorithms' numpy work is small linear algebra: the linear baselines' Gram matrices and least squares (a few
hundred to a few thousand samples by 2 x obs_dim + 4 features), acting with a numpy forward. numpy's OpenBLAS runs
such calls on all cores once they pass a size threshold, and its worker threads then busy-wait for the next call: in
PointGoalHazard meta-training (500-step batches, 2 cores) the second core spun for about a quarter of the process's
CPU time, for the same wall-clock time, and was not free for anything else (another seed, the envs' workers). So
``learn``, ``adapt``, ``adaptation_steps`` and ``evaluate_params`` run with numpy's BLAS limited to ``BLAS_THREADS``
threads (through ``threadpoolctl``, for the BLAS libraries loaded when the call starts) and restore the previous
setting afterwards. torch's own threads are left to the user (``torch.set_num_threads``), as in SB3. The setting is
process-wide: algorithms trained in several Python threads of one process share it (the first to finish restores
the setting found at its start while the others still run).

The numbers: OpenBLAS's threaded Gram matrix (``features.T @ features``) equals the single-threaded one up to 92
features here (PointGoalHazard's, CarCircle's, HalfCheetahVelocity's and Toy2DNav's: trained parameters bit for bit
the same with 1 or 2 threads), and differs in the last bits from about 96 features on (PointButtonHazard's 124), so
a run with such observations depended on the machine's core count; with the limit it does not (on the same CPU
type: OpenBLAS picks its kernels by CPU). ``tests/test_threads.py``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, cast

BLAS_THREADS: int | None = 1
"""Threads numpy's BLAS may use while an algorithm of this package runs (``learn``, ``adapt``,
``adaptation_steps``, ``evaluate_params``); ``None`` leaves the BLAS libraries' own setting (all cores by default,
or ``OPENBLAS_NUM_THREADS``). Set it before the call, e.g. ``sb3_metacpo.common.threads.BLAS_THREADS = None``."""

F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def limited_blas_threads() -> Iterator[None]:
    """numpy's (and any other loaded) BLAS limited to ``BLAS_THREADS`` threads inside the block, restored after."""
    limit = BLAS_THREADS
    if limit is None:
        yield
        return
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"sb3_metacpo.common.threads.BLAS_THREADS must be a positive integer or None, got {limit!r}")
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=limit, user_api="blas"):
        yield


def with_limited_blas_threads(method: F) -> F:
    """Run ``method`` inside :func:`limited_blas_threads`. A generator function runs each of its steps (up to the
    next value it yields) inside it, so that the caller's own code between two values is left alone."""
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def generator(*args: Any, **kwargs: Any) -> Iterator[Any]:
            steps = method(*args, **kwargs)
            try:
                while True:
                    with limited_blas_threads():
                        try:
                            value = next(steps)
                        except StopIteration as stop:
                            return stop.value
                    yield value
            finally:
                steps.close()

        return cast(F, generator)

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with limited_blas_threads():
            return method(*args, **kwargs)

    return cast(F, wrapper)
