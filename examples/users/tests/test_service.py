"""Users over real gRPC on loopback, and registered in a real etcd."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import tether
from tether.testing import EtcdServer, loopback_config, running

from users.service import create_app
from users.v1 import users_pb2 as pb
from users.v1 import users_pb2_grpc as pb_grpc

SERVICE = "users"
TIMEOUT = 5.0

Stub = pb_grpc.UsersStub


@pytest.fixture
async def app() -> AsyncIterator[tether.App]:
    async with running(create_app(loopback_config(SERVICE))) as app:
        yield app


@pytest.fixture
async def channel(app: tether.App) -> AsyncIterator[grpc.aio.Channel]:
    async with tether.dial(app.target) as channel:
        yield channel


async def test_get_user_finds_one_and_refuses_an_unknown_id(
    app: tether.App, channel: grpc.aio.Channel
) -> None:
    stub = Stub(channel)
    user = await stub.GetUser(pb.GetUserRequest(id="u1"), timeout=TIMEOUT)
    assert (user.name, user.tier, user.degraded) == ("Ada", "gold", False)
    assert user.served_by == app.instance_id
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetUser(pb.GetUserRequest(id="nobody"), timeout=TIMEOUT)
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND


async def test_a_fault_makes_get_user_unavailable_until_healed(
    app: tether.App, channel: grpc.aio.Channel
) -> None:
    admin = pb_grpc.UsersAdminStub(channel)
    await admin.SetFault(pb.SetFaultRequest(failing=True), timeout=TIMEOUT)
    # A plain gRPC client sees the failure itself; a tether client gets the declared fallback.
    async with grpc.aio.insecure_channel(app.target) as plain:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await Stub(plain).GetUser(pb.GetUserRequest(id="u1"), timeout=TIMEOUT)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    guest = await Stub(channel).GetUser(pb.GetUserRequest(id="u1"), timeout=TIMEOUT)
    assert (guest.name, guest.degraded) == ("guest", True)
    await admin.SetFault(pb.SetFaultRequest(failing=False), timeout=TIMEOUT)
    user = await Stub(channel).GetUser(pb.GetUserRequest(id="u1"), timeout=TIMEOUT)
    assert (user.name, user.degraded) == ("Ada", False)


async def test_registers_in_etcd_and_is_called_by_name(etcd: EtcdServer) -> None:
    registry = {"backend": "etcd", "endpoints": [etcd.endpoint], "ttl_seconds": 2}
    server = create_app(loopback_config(SERVICE, registry=registry))
    caller = tether.App(loopback_config("caller", registry=registry))
    async with running(server), running(caller):
        user = await caller.client(SERVICE, Stub).GetUser(
            pb.GetUserRequest(id="u2"), timeout=TIMEOUT
        )
    assert user.name == "Grace"


async def test_callers_get_the_declared_guest_when_users_is_down() -> None:
    """The proto's fallback: a caller that cannot reach users gets a degraded guest."""
    async with tether.dial("127.0.0.1:1", service=SERVICE) as channel:
        user = await Stub(channel).GetUser(pb.GetUserRequest(id="u1"), timeout=TIMEOUT)
    assert (user.name, user.degraded) == ("guest", True)
