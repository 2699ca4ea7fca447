"""GET / and the page's files, in process (httpx on create_app): who gets the page, who gets the
JSON description, --no-webui, /stats, and which of them the API key guards. What the page does
in a browser is tested in test_webui_browser.py."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from openelm_server.config import Settings, load_settings
from openelm_server.serving.app import create_app
from openelm_server.startup import build_engine

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
API_KEY = "webui-key-0123"


@pytest.fixture(scope="module")
def built(own_model_dir, own_tokenizer_dir):
    settings = Settings(
        model_path=str(own_model_dir),
        tokenizer_path=str(own_tokenizer_dir),
        device="cpu",
        max_batch_size=2,
        max_model_len=256,
        served_model_name="OpenELM-3B-Instruct",
    )
    engine, tokenizer = build_engine(settings)
    yield settings, engine, tokenizer
    engine.shutdown()


def call(built, method: str, path: str, headers: dict | None = None, **overrides) -> httpx.Response:
    settings, engine, tokenizer = built
    app = create_app(Settings(**{**settings.__dict__, **overrides}), engine, tokenizer)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.request(method, path, headers=headers or {})

    return asyncio.run(go())


def test_a_browser_gets_the_page(built):
    response = call(built, "GET", "/", {"Accept": BROWSER_ACCEPT})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert 'data-testid="prompt"' in response.text
    assert "Accept" in response.headers["vary"]


@pytest.mark.parametrize("accept", [None, "*/*", "application/json"])
def test_other_clients_get_a_json_description(built, accept):
    response = call(built, "GET", "/", {"Accept": accept} if accept else {})
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "OpenELM-3B-Instruct"
    assert body["links"]["docs"] == "/docs" and body["links"]["models"] == "/v1/models"
    assert "browser" in body["web_page"]


def test_no_webui_answers_the_description_even_to_a_browser(built):
    response = call(built, "GET", "/", {"Accept": BROWSER_ACCEPT}, webui=False)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json()["web_page"] == "off (--no-webui)"
    assert response.json()["links"] == {"docs": "/docs", "models": "/v1/models", "health": "/health", "stats": "/stats"}
    assert call(built, "GET", "/webui/app.js", webui=False).status_code == 404


@pytest.mark.parametrize(
    "name, media_type",
    [
        ("app.js", "text/javascript"),
        ("markdown.js", "text/javascript"),
        ("sse.js", "text/javascript"),
        ("style.css", "text/css"),
    ],
)
def test_the_page_files_are_served_from_the_package(built, name, media_type, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # found beside the package, not in the working directory
    response = call(built, "GET", f"/webui/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(media_type)
    assert response.headers["cache-control"] == "no-cache"


@pytest.mark.parametrize("path", ["/webui/nope.js", "/webui/index.html", "/webui/..%2fwebui.py", "/webui/"])
def test_nothing_else_under_webui_is_served(built, path):
    response = call(built, "GET", path)
    assert response.status_code == 404
    assert "error" in response.json()


def test_the_page_is_open_but_the_data_needs_the_key(built):
    """A browser loads the page without a key, then the page asks for it; /stats (the live
    state) is guarded like every route but /health."""
    for path in ("/", "/webui/app.js", "/webui/style.css"):
        assert call(built, "GET", path, {"Accept": BROWSER_ACCEPT}, api_key=API_KEY).status_code == 200
    assert call(built, "GET", "/", api_key=API_KEY).status_code == 200  # the JSON description
    assert call(built, "POST", "/", api_key=API_KEY).status_code == 401  # the tutorial's route stays guarded
    assert call(built, "GET", "/stats", api_key=API_KEY).status_code == 401
    assert call(built, "GET", "/stats", {"Authorization": "Bearer nope"}, api_key=API_KEY).status_code == 401
    response = call(built, "GET", "/stats", {"Authorization": f"Bearer {API_KEY}"}, api_key=API_KEY)
    assert response.status_code == 200


def test_page_files_count_under_one_metrics_route(built):
    """Any path under /webui/ is one label in /metrics, not one per path a scanner tries."""
    settings, engine, tokenizer = built
    app = create_app(settings, engine, tokenizer)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            for path in ("/webui/app.js", "/webui/style.css", "/webui/no-such-file", "/"):
                await client.get(path)
            return (await client.get("/metrics")).text

    metrics = asyncio.run(go())
    assert 'openelm_http_requests_total{route="/webui/{name}",status="200"} 2.0' in metrics
    assert 'openelm_http_requests_total{route="/webui/{name}",status="404"} 1.0' in metrics
    assert 'openelm_http_requests_total{route="/",status="200"} 1.0' in metrics


def test_stats_reports_the_live_state(built):
    body = call(built, "GET", "/stats").json()
    assert body == {
        "model": "OpenELM-3B-Instruct",
        "requests_running": 0,
        "requests_waiting": 0,
        "kv_cache_blocks_used": 0,
        "kv_cache_blocks_total": 32,  # 2 requests x 256 tokens in blocks of 16
        "kv_cache_usage": 0.0,
        "prefix_cache_hit_tokens": 0,
        "max_model_len": 256,
        "max_tokens_limit": 2048,
    }


def test_webui_flag_and_env_twin():
    assert load_settings([], {}).webui is True
    assert load_settings(["--no-webui"], {}).webui is False
    assert load_settings([], {"WEBUI": "0"}).webui is False
    assert load_settings(["--webui"], {"WEBUI": "0"}).webui is True
