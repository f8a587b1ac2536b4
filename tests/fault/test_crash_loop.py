"""Fifty SIGKILLs at random moments under load: the history clients saw always checks out."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable

import grpc
import pytest

from tests.fault.history import History, crash_cycle
from tests.support import SidecarProcess

CYCLES = 50
KEYS = 12
CLIENTS_PER_KEY = 2


@pytest.mark.slow
# About a minute on a quiet machine; give a loaded one room.
@pytest.mark.timeout(600)
@pytest.mark.parametrize("approvals", [False, True], ids=["approvals-off", "failed-abandoned-expired-need-approval"])
async def test_fifty_crashes_at_random_moments_lose_nothing_acknowledged(
    sidecar_factory: Callable[..., SidecarProcess], approvals: bool
) -> None:
    rng = random.Random(20261125)
    sidecar = sidecar_factory(*(("--abandoned-requires-approval", "--expired-requires-approval") if approvals else ()))
    keys = [f"t-{uuid.uuid4().hex}::crash-{i}" for i in range(KEYS)]
    history = History()
    for cycle in range(CYCLES):
        # The moment of the kill: after a random number of answers, from almost at once to well into the load.
        await crash_cycle(
            sidecar,
            keys,
            history,
            acks=rng.randint(1, 120),
            clients_per_key=CLIENTS_PER_KEY,
            seed=cycle,
            approvals=approvals,
        )
    kinds = {ack.kind for ack in history.acks}
    assert {"acquired", "released", "refused", "renewed"} | ({"approved"} if approvals else set()) <= kinds
    assert not history.codes.keys() & {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}, history.codes
    assert sidecar.starts == CYCLES + 1
