"""The WatchGuards and WatchGuardBatches streams: the hub's batches written out until the watch ends."""

from __future__ import annotations

import asyncio
from typing import Any

from grpc import aio

from taskguard.front import wire
from taskguard.front.rpc import Call, Draining
from taskguard.guard.model import EventType
from taskguard.runtime.events import EventHub, Watcher, WatchOverflow
from taskguard_client.v1 import taskguard_pb2 as pb

# Events in one WatchGuardBatches message at most (well under the 4 MiB a client takes by default).
_BATCH_EVENTS = 256


async def serve_watch(
    hub: EventHub,
    encoder: wire.EventEncoder,
    request: pb.WatchGuardsRequest,
    context: aio.ServicerContext[Any, Any],
    call: Call,
    *,
    batched: bool,
    draining: asyncio.Future[None],
) -> None:
    """Write the watch's events until it falls behind (RESOURCE_EXHAUSTED), the sidecar drains, or it fails."""
    # On the owner-only socket every connection reads "unix:": then the caller is all that tells them apart.
    watcher = hub.open(wire.key_prefix(request.key_prefix), f"{call.caller.principal} {context.peer()}")
    # Headers now, so a client knows its watch is established before the first event.
    await context.send_initial_metadata(())
    pump = asyncio.ensure_future(_pump(hub, encoder, watcher, request, context, batched))
    overflowed = asyncio.ensure_future(watcher.overflowed.wait())
    waits: set[asyncio.Future[Any]] = {pump, overflowed, draining}
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if pump.done():
            pump.result()
        elif overflowed.done():
            raise WatchOverflow(watcher.delivered)
        else:
            raise Draining()
    finally:
        for task in (pump, overflowed):
            task.cancel()
        hub.close(watcher)


async def _pump(
    hub: EventHub,
    encoder: wire.EventEncoder,
    watcher: Watcher,
    request: pb.WatchGuardsRequest,
    context: aio.ServicerContext[Any, Any],
    batched: bool,
) -> None:
    limit = _BATCH_EVENTS if batched else 1
    async for batch in hub.batches(watcher, request.start_revision, request.include_snapshot, limit):
        await context.write(encoder.batch(batch) if batched else encoder.event(batch[0]))
        if batch[-1].type is not EventType.SNAPSHOT:
            watcher.delivered = batch[-1].revision
