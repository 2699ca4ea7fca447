"""/metrics: Prometheus text whose counters, gauges and histograms count what happened."""

from __future__ import annotations

import uuid

import requests
from http_checks import chat, completion, scrape, tutorial, value
from prometheus_client.parser import text_string_to_metric_families


def test_metrics_are_prometheus_text_and_count_what_happened(server):
    response = requests.get(server.url + "/metrics", timeout=10)
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert families["openelm_http_requests"].type == "counter"
    for name in ("openelm_requests_waiting", "openelm_requests_running", "openelm_kv_cache_usage_ratio"):
        assert families[name].type == "gauge", name
    for name in (
        "openelm_time_to_first_token_seconds",
        "openelm_time_per_output_token_seconds",
        "openelm_e2e_request_latency_seconds",
    ):
        assert families[name].type == "histogram", name
    assert families["openelm_prompt_tokens"].type == "counter"
    assert families["openelm_generation_tokens"].type == "counter"

    before = scrape(server.url)
    assert requests.post(server.url + "/", json=tutorial(n=8), timeout=60).status_code == 200
    assert requests.post(server.url + "/", json=tutorial(n=0), timeout=60).status_code == 400
    usage = requests.post(server.url + "/v1/completions", json=completion(n=5), timeout=60).json()["usage"]
    with requests.post(server.url + "/v1/chat/completions", json=chat(n=5, stream=True), stream=True, timeout=60) as r:
        assert r.status_code == 200 and "[DONE]" in r.text
    assert requests.get(server.url + "/no-such-route-" + uuid.uuid4().hex, timeout=10).status_code == 404
    after = scrape(server.url)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("openelm_http_requests_total", route="/", status="200") >= 1
    assert delta("openelm_http_requests_total", route="/", status="400") >= 1
    assert delta("openelm_http_requests_total", route="/v1/completions", status="200") >= 1
    assert delta("openelm_http_requests_total", route="/v1/chat/completions", status="200") >= 1
    # Unknown paths share one label value: no label per path a scanner tries.
    assert delta("openelm_http_requests_total", route="other", status="404") >= 1
    assert not any(labels and dict(labels).get("route", "").startswith("/no-such-route") for _, labels in after)
    assert delta("openelm_prompt_tokens_total") >= usage["prompt_tokens"] + 2
    assert delta("openelm_generation_tokens_total") >= 8 + usage["completion_tokens"] + 5
    for name in (
        "openelm_time_to_first_token_seconds",
        "openelm_time_per_output_token_seconds",
        "openelm_e2e_request_latency_seconds",
    ):
        assert delta(name + "_count") >= 3, name
        assert delta(name + "_sum") > 0, name
    assert value(after, "openelm_requests_running") == 0
    assert value(after, "openelm_requests_waiting") == 0
    assert 0 <= value(after, "openelm_kv_cache_usage_ratio") <= 1
