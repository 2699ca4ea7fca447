"""``X-Replica-Id`` on every response: which server process answered.

Behind a load balancer (Ray Serve, a Kubernetes Service) an operator reading a client's
report needs to know which replica served it, to find its logs and metrics.
"""

from __future__ import annotations

import os
import secrets
import socket

REPLICA_ID_HEADER = b"x-replica-id"


def new_replica_id(suffix: str | None = None) -> str:
    """hostname-pid-suffix: the host and process to look at, and a suffix that keeps ids
    unique when a pid is reused (a random one unless the caller has its own, such as Ray
    Serve's replica id)."""
    return f"{socket.gethostname()}-{os.getpid()}-{suffix or secrets.token_hex(4)}"


class ReplicaIdMiddleware:
    """Plain ASGI, so that streamed responses pass through untouched."""

    def __init__(self, app, replica_id: str):
        self.app = app
        self.header = (REPLICA_ID_HEADER, replica_id.encode("latin-1"))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_replica_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + [self.header]
            await send(message)

        await self.app(scope, receive, send_with_replica_id)
