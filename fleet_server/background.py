"""Background loops that live as long as the app: one helper instead of a lifespan per package.

The server runs a few periodic loops (rollout evaluation, telemetry maintenance, TUF refresh,
last-seen flush). Each package's router declares its loop with :func:`app_task`; the loop starts
with the app only when ``settings.background_tasks`` is on (tests and extra API processes can turn
it off) and is cancelled, and awaited, on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from fastapi import FastAPI

LoopFactory = Callable[[FastAPI], Coroutine[Any, Any, None]]


def app_task(make_loop: LoopFactory) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    """A router ``lifespan`` that runs ``make_loop(app)`` for the app's lifetime when background tasks are on."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = None
        if getattr(app.state.settings, "background_tasks", False):
            task = asyncio.create_task(make_loop(app))
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    return lifespan
