"""The Users servicer (an in-memory directory) and the App that serves it."""

from __future__ import annotations

import grpc
import tether

from users.v1 import users_pb2 as pb
from users.v1 import users_pb2_grpc as pb_grpc

__all__ = ["DIRECTORY", "UsersAdminServicer", "UsersServicer", "create_app"]

log = tether.get_logger("users")

_Context = grpc.aio.ServicerContext[object, object]

#: The shop's customers: id -> (name, tier).
DIRECTORY: dict[str, tuple[str, str]] = {
    "u1": ("Ada", "gold"),
    "u2": ("Grace", "standard"),
    "u3": ("Linus", "standard"),
}


class UsersServicer(pb_grpc.UsersServicer):
    """Looks users up; fails on purpose while the admin service says so."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.failing = False

    async def GetUser(  # noqa: N802 - the name is the RPC's
        self, request: pb.GetUserRequest, context: _Context
    ) -> pb.User:
        if self.failing:
            raise tether.Unavailable("users is failing on purpose (UsersAdmin/SetFault)")
        entry = DIRECTORY.get(request.id)
        if entry is None:
            raise tether.NotFound(f"no user {request.id!r}")
        name, tier = entry
        log.info("user found", user_id=request.id)
        return pb.User(id=request.id, name=name, tier=tier, served_by=self.instance)


class UsersAdminServicer(pb_grpc.UsersAdminServicer):
    """Turns this instance's failure mode on and off."""

    def __init__(self, users: UsersServicer) -> None:
        self._users = users

    async def SetFault(  # noqa: N802 - the name is the RPC's
        self, request: pb.SetFaultRequest, context: _Context
    ) -> pb.SetFaultReply:
        self._users.failing = request.failing
        log.warning("fault set", failing=request.failing)
        return pb.SetFaultReply(failing=request.failing, instance=self._users.instance)


def create_app(config: tether.TetherConfig | None = None) -> tether.App:
    """Build the App serving ``users.v1.Users`` and ``users.v1.UsersAdmin``.

    Args:
        config: the configuration; when None it is loaded from ``$TETHER_CONFIG``, else
            ``./tether.yaml``, with ``TETHER_*`` environment variables on top.
    """
    app = tether.App(config)
    users = UsersServicer(app.instance_id)
    app.add_servicer(pb_grpc.add_UsersServicer_to_server, users)
    app.add_servicer(pb_grpc.add_UsersAdminServicer_to_server, UsersAdminServicer(users))
    return app
