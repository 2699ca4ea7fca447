"""The stop-string matcher on streamed pieces of text: what it holds back, releases and cuts."""

from __future__ import annotations

from openelm_server.engine.output import StopStringMatcher


def run_matcher(stops: tuple[str, ...], pieces: list[str]) -> tuple[list[str], bool]:
    matcher = StopStringMatcher(stops)
    out = [matcher.add(piece) for piece in pieces]
    out.append(matcher.finish())
    return out, matcher.stopped


def test_stop_string_across_several_pieces():
    out, stopped = run_matcher(("STOP",), ["abc S", "T", "O", "P tail", " more"])
    assert stopped and "".join(out) == "abc "
    assert out[0] == "abc ", "text that cannot start a stop string is released at once"
    assert not any("S" in piece for piece in out)


def test_stop_string_partial_match_is_released_when_it_fails():
    out, stopped = run_matcher(("STOP",), ["abc S", "T", "x", "yz"])
    assert not stopped
    assert out[:2] == ["abc ", ""]
    assert out[2] == "STx"
    assert "".join(out) == "abc STxyz"


def test_held_back_partial_stop_is_released_by_finish():
    out, stopped = run_matcher(("STOP",), ["abc", " ST"])
    assert not stopped
    assert out == ["abc", " ", "ST"]


def test_stop_string_inside_one_piece_and_nothing_after():
    out, stopped = run_matcher(("<end>",), ["hello<end>world", "more"])
    assert stopped and out == ["hello", "", ""]


def test_earliest_of_several_stop_strings():
    out, stopped = run_matcher(("world", "lo w", "xyz"), ["hel", "lo wo", "rld"])
    assert stopped and "".join(out) == "hel"


def test_overlapping_stop_prefixes():
    # "aab" after "aaa": the partial match must slide, not restart.
    out, stopped = run_matcher(("aab",), ["a", "a", "a", "b", "c"])
    assert stopped and "".join(out) == "a"
    out, stopped = run_matcher(("ab", "bc"), ["xa", "c"])
    assert not stopped and "".join(out) == "xac"


def test_stop_string_at_the_very_start():
    out, stopped = run_matcher(("He",), ["H", "ello"])
    assert stopped and out == ["", "", ""]


def test_chinese_stop_string_across_pieces():
    out, stopped = run_matcher(("介绍",), ["你好，请介", "绍一下"])
    assert stopped and "".join(out) == "你好，请"


def test_no_stop_strings_release_everything():
    out, stopped = run_matcher((), ["a", "b", ""])
    assert not stopped and out == ["a", "b", "", ""]
