"""The scheduler's channels to sidecars: connect, prove the secret, read, reconnect.

One task per worker keeps a channel open to its sidecar for as long as the
worker is known, reconnecting with a capped back-off. What arrives is handed
to a :class:`ChannelEvents` (the scheduler); nothing here decides anything.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from damops import protocol
from damops.protocol import Welcome

log = logging.getLogger("damops.scheduler")


class ChannelEvents(Protocol):
    def on_welcome(self, name: str, welcome: Welcome) -> None: ...
    def on_message(self, name: str, message: protocol.Message) -> None: ...
    def on_lost(self, name: str) -> None: ...


class SidecarChannels:
    def __init__(self, secret: str, events: ChannelEvents) -> None:
        self.secret = secret
        self.events = events
        self.addresses: dict[str, tuple[str, int]] = {}
        self._open: dict[str, protocol.Channel] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # Off once the scheduler stops: a channel that drops then (another scheduler
        # took the sidecar over, as in an operator restart) is not taken back.
        self.reconnect = True

    def open(self, name: str, host: str, port: int) -> None:
        self.addresses[name] = (host, port)
        self._tasks[name] = asyncio.create_task(self._keep(name), name=f"channel-{name}")

    def close(self, name: str) -> None:
        self.addresses.pop(name, None)
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()

    async def close_all(self) -> None:
        tasks = list(self._tasks.values())
        for name in list(self._tasks):
            self.close(name)
        await asyncio.gather(*tasks, return_exceptions=True)

    def send(self, name: str, message: protocol._Message) -> None:
        """Queue a frame; raises KeyError without a channel, ProtocolError when it cannot be encoded."""
        self._open[name].send_nowait(message)

    async def _keep(self, name: str) -> None:
        delay = 0.05
        while name in self.addresses:
            channel: protocol.Channel | None = None
            try:
                host, port = self.addresses[name]
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
                channel = protocol.Channel(reader, writer)
                await channel.open_handshake(self.secret, "scheduler")
                welcome = await channel.receive()
                if not isinstance(welcome, Welcome):
                    raise protocol.ProtocolError(f"expected welcome, got {welcome.type}")
                self._open[name] = channel
                delay = 0.05
                self.events.on_welcome(name, welcome)
                await self._read(name, channel)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, protocol.ProtocolError) as exc:
                if name in self._open:
                    log.warning("channel to worker %s dropped: %s", name, exc or type(exc).__name__)
            finally:
                if channel is not None:
                    if self._open.get(name) is channel:
                        del self._open[name]
                    channel.close_nowait()
                self.events.on_lost(name)
            if not self.reconnect:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _read(self, name: str, channel: protocol.Channel) -> None:
        def on_frame(message: protocol.Message, frame: bytes) -> None:
            if not isinstance(message, protocol.Heartbeat):
                self.events.on_message(name, message)

        beat = asyncio.create_task(protocol.heartbeat_loop(channel))
        try:
            await channel.dispatch(on_frame)  # ends by raising: the channel dropped
        finally:
            beat.cancel()
