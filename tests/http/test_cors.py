"""CORS: off by default; with --cors-origins, exactly those origins, also on the guard's errors."""

from __future__ import annotations

import pytest
import requests
from http_checks import bearer, chat, tutorial
from in_process import ServerThread

API_KEY = "s3cret-key-0123456789"
ALLOWED_ORIGIN = "http://a.example"
OTHER_ORIGIN = "http://b.example"


@pytest.fixture(scope="module")
def cors_server(serving_dirs):
    flags = ("--api-key", API_KEY, "--cors-origins", ALLOWED_ORIGIN, "--max-batch-size", "2", "--max-model-len", "256")
    with ServerThread(*serving_dirs, *flags) as server:
        yield server


def preflight(url: str, origin: str) -> requests.Response:
    return requests.options(
        url,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
        timeout=10,
    )


def test_cors_is_off_by_default(server):
    for path in ("/", "/v1/chat/completions"):
        assert "access-control-allow-origin" not in preflight(server.url + path, ALLOWED_ORIGIN).headers
    response = requests.get(server.url + "/health", headers={"Origin": ALLOWED_ORIGIN}, timeout=10)
    assert "access-control-allow-origin" not in response.headers
    response = requests.post(server.url + "/", json=tutorial(n=2), headers={"Origin": ALLOWED_ORIGIN}, timeout=30)
    assert "access-control-allow-origin" not in response.headers


def test_cors_allows_exactly_the_configured_origin(cors_server):
    url = cors_server.url
    allowed = preflight(url + "/v1/chat/completions", ALLOWED_ORIGIN)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-origin" not in preflight(url + "/v1/chat/completions", OTHER_ORIGIN).headers
    assert "access-control-allow-origin" not in preflight(url + "/", "http://a.example.evil.com").headers

    response = requests.post(
        url + "/v1/chat/completions", json=chat(n=2), headers={**bearer(API_KEY), "Origin": ALLOWED_ORIGIN}, timeout=30
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "x-request-id" in response.headers.get("access-control-expose-headers", "").lower()
    response = requests.get(url + "/health", headers={"Origin": OTHER_ORIGIN}, timeout=10)
    assert "access-control-allow-origin" not in response.headers


def test_cors_headers_on_errors_answered_by_the_guard(cors_server):
    """A browser page on an allowed origin must be able to read a 401 / 413 (else it sees an
    opaque network error instead of 'missing or invalid API key')."""
    url = cors_server.url
    response = requests.post(
        url + "/v1/chat/completions", json=chat(n=2), headers={"Origin": ALLOWED_ORIGIN}, timeout=30
    )
    assert response.status_code == 401
    assert response.headers.get("access-control-allow-origin") == ALLOWED_ORIGIN
