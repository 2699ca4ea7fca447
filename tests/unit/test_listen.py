"""Where to open the server, from the address it listens on."""

from __future__ import annotations

from openelm_server.listen import where_to_open


def test_where_to_open():
    assert where_to_open("127.0.0.1", 8000) == ["open http://127.0.0.1:8000 (Press CTRL+C to quit)"]
    assert where_to_open("::1", 8000) == ["open http://[::1]:8000 (Press CTRL+C to quit)"]
    lines = where_to_open("0.0.0.0", 6006)
    assert lines[0] == "open http://127.0.0.1:6006 on this machine (Press CTRL+C to quit)"
    assert "AutoDL" in lines[-1] and "6006" in lines[-1]
    assert where_to_open("::", 7000)[0].startswith("open http://[::1]:7000")
    assert not any("AutoDL" in line for line in where_to_open("0.0.0.0", 7000))
