"""ListGuards filters and paging, GetGuard, health and reflection."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.support import InProcess, SidecarProcess, acquire

pytestmark = pytest.mark.backends("sqlite", "etcd")


async def _list_all(stub: pb_grpc.TaskGuardStub, **request: object) -> list[pb.Guard]:
    guards: list[pb.Guard] = []
    token = ""
    while True:
        page = await stub.ListGuards(pb.ListGuardsRequest(page_token=token, **request))  # type: ignore[arg-type]
        guards.extend(page.guards)
        token = page.next_page_token
        if not token:
            return guards


async def test_list_pages_through_every_guard_under_a_prefix_in_key_order(in_process: InProcess, key: str) -> None:
    stub = in_process.stub
    keys = [f"{key}/{i:03d}" for i in range(37)]
    for task_key in keys:
        await acquire(stub, task_key)
    await acquire(stub, "elsewhere::job")
    listed = await _list_all(stub, key_prefix=key + "/", page_size=5)
    assert [g.task_key for g in listed] == keys
    first = await stub.ListGuards(pb.ListGuardsRequest(key_prefix=key + "/", page_size=10))
    assert len(first.guards) == 10 and first.next_page_token


async def test_list_filters_by_state_and_staleness(manual: InProcess, key: str) -> None:
    stub = manual.stub
    running = await acquire(stub, key + "/running", ttl_s=3600)
    failed = await acquire(stub, key + "/failed")
    await stub.Release(pb.ReleaseRequest(lease_id=failed.lease_id, status=pb.RUN_STATUS_FAILED))
    await acquire(stub, key + "/expiring", ttl_s=5)
    await manual.advance(6)
    states = await _list_all(stub, key_prefix=key, states=[pb.GUARD_STATE_FAILED, pb.GUARD_STATE_RUNNING])
    assert sorted(g.task_key for g in states) == [key + "/failed", key + "/running"]
    stale = await _list_all(stub, key_prefix=key, stale_only=True)
    assert [g.task_key for g in stale] == [key + "/expiring"]
    await manual.advance(manual.stale_after_s + 1)
    stale = await _list_all(stub, key_prefix=key, stale_only=True)
    assert sorted(g.task_key for g in stale) == [key + "/expiring", key + "/running"]
    assert all(g.stale for g in stale)
    renewed = (await stub.Renew(pb.RenewRequest(lease_id=running.lease_id))).guard
    assert not renewed.stale


async def test_health_and_reflection_are_served(sidecar: SidecarProcess) -> None:
    async with aio.insecure_channel(sidecar.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "taskguard.v1.TaskGuard"):
            response = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = reflection.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        answer = await call.read()
        await call.done_writing()
        names = {service.name for service in answer.list_services_response.service}
        assert "taskguard.v1.TaskGuard" in names and "grpc.health.v1.Health" in names
        assert await call.code() == grpc.StatusCode.OK


async def test_the_health_only_listener_serves_health_and_nothing_else(sidecar_factory: Any) -> None:
    sidecar: SidecarProcess = sidecar_factory("--health-listen", "127.0.0.1:0")
    assert sidecar.health_address
    async with aio.insecure_channel(sidecar.health_address) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await pb_grpc.TaskGuardStub(channel).ListGuards(pb.ListGuardsRequest())
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
