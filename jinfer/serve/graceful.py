"""uvicorn's server with a graceful shutdown that ends long requests cleanly."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import uvicorn


class GracefulServer(uvicorn.Server):
    """On SIGTERM / Ctrl-C uvicorn stops accepting and waits for open responses. Here, requests
    still running `grace` seconds later are aborted through `abort` (run in a worker thread), so
    their responses end cleanly (streams: finish_reason "abort" then [DONE]; others: 503) instead
    of being cut by uvicorn's task cancellation (set its timeout_graceful_shutdown above `grace`)."""

    def __init__(self, config: uvicorn.Config, grace: float, abort: Callable[[], None]):
        super().__init__(config)
        self._grace, self._abort = grace, abort

    async def shutdown(self, sockets=None) -> None:
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self._grace, lambda: loop.run_in_executor(None, self._abort))
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()
