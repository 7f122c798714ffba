"""Honouring a cancellation that a library lost on the way.

Python 3.11's ``asyncio.wait_for`` (which aio-pika, aiormq and others use for their time-outs) drops a
cancellation that lands just as its inner call completes: the caller's task goes on as if nothing had
been asked. A retry loop (``except Exception: sleep; retry``) then runs forever, and a role's shutdown,
which cancels its background loops and awaits them, hangs. The request is not lost everywhere: the
task still counts it (:meth:`asyncio.Task.cancelling`) until someone calls ``uncancel``. The loops that
run until cancelled check it at each retry and after each unit of work."""

from __future__ import annotations

import asyncio


def raise_if_cancelling(cause: BaseException | None = None) -> None:
    """Raise :class:`asyncio.CancelledError` if the current task was asked to stop and is still running
    (something swallowed the request, or turned it into the error ``cause``)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from cause


async def retry_pause(delay: float, cause: BaseException | None = None) -> None:
    """The pause before a retry, for loops that run until cancelled: raises instead if the task was asked
    to stop (see the module docstring)."""
    raise_if_cancelling(cause)
    await asyncio.sleep(delay)
