"""``GET /stats``: the server's live state as JSON, for the web page and for people with curl.

The same numbers as the gauges of /metrics, without a Prometheus parser; like every route but
/health it needs the API key when one is set.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

router = APIRouter()


class ServerStats(BaseModel):
    model: str
    requests_running: int
    requests_waiting: int
    kv_cache_blocks_used: int
    kv_cache_blocks_total: int
    prefix_cache_hit_tokens: int
    kv_cache_usage: float
    max_model_len: int
    max_tokens_limit: int


@router.get("/stats", response_model=ServerStats)
async def server_stats(request: Request) -> ServerStats:
    gateway = request.app.state.gateway
    stats = gateway.engine.stats()
    return ServerStats(
        model=request.app.state.settings.model_name,
        requests_running=stats.running,
        requests_waiting=stats.waiting,
        kv_cache_blocks_used=stats.kv_blocks_used,
        kv_cache_blocks_total=stats.kv_blocks_total,
        kv_cache_usage=stats.kv_blocks_used / stats.kv_blocks_total,
        prefix_cache_hit_tokens=stats.prefix_cache_hits,
        max_model_len=gateway.max_model_len,
        max_tokens_limit=gateway.settings.max_tokens_limit,
    )
