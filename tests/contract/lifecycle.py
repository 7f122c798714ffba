"""The lifecycle every backend shares (:class:`im.backends.lifecycle.Service`), checked on an implementation.

Each contract harness calls :func:`check_lifecycle` with a factory of unstarted implementations on its
storage and a probe (one cheap call that needs the service started): start twice, close twice, close
without start, start after close refused, ``async with``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from im.backends.lifecycle import Service

S = TypeVar("S", bound=Service)


async def check_lifecycle(make: Callable[[], S], probe: Callable[[S], Awaitable[object]]) -> None:
    # Started twice, it works; closed twice, nothing fails; closed stays closed.
    service = make()
    assert not service.started and not service.closed
    await service.start()
    await service.start()
    assert service.started
    await probe(service)
    await service.close()
    await service.close()
    assert service.closed and not service.started
    with pytest.raises(RuntimeError, match="closed"):
        await service.start()

    # Closed without ever being started (a role that failed before starting it).
    never = make()
    await never.close()
    await never.close()
    assert never.closed and not never.started
    with pytest.raises(RuntimeError, match="closed"):
        await never.start()

    # async with: started inside, closed on the way out (also on error).
    async with make() as inside:
        assert inside.started
        await probe(inside)
    assert inside.closed
    failing = make()
    with pytest.raises(ZeroDivisionError):
        async with failing:
            1 / 0  # noqa: B018
    assert failing.closed
