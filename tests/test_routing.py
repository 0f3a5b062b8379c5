"""Routing: meta.type to sink names, by glob patterns, with fan-out and a default."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.routing import Route, RouteTable, describe, matches, route

FAST = settings(max_examples=200, deadline=None)


def table(
    *routes: tuple[str | list[str], str | list[str]], default: tuple[str, ...] = ()
) -> RouteTable:
    return RouteTable(tuple(Route(_names(m), _names(t)) for m, t in routes), default)


def _names(value: str | Sequence[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


# -- glob semantics ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "type_", "expected"),
    [
        ("medical.*", "medical.document-download", True),
        ("medical.*", "medical.document-download.failed", True),  # * crosses dots
        ("medical.*", "medical.", True),
        ("medical.*", "medical", False),
        ("medical.*", "xmedical.document-download", False),  # anchored at the start
        ("*.admit", "patient.admit", True),
        ("*.admit", "patient.admit.late", False),  # anchored at the end
        ("patient.admit", "patient.admit", True),
        ("patient.admit", "patient.admitted", False),  # whole type, not a prefix
        ("patient.admit", "patient-admit", False),  # '.' is literal, not a regex wildcard
        ("Patient.*", "patient.admit", False),  # case-sensitive
        ("patient.*", "PATIENT.ADMIT", False),
        ("patient.?dmit", "patient.admit", True),
        ("patient.?dmit", "patient.dmit", False),  # ? is exactly one character
        ("patient.?dmit", "patient.xxdmit", False),
        ("patient.[adt]*", "patient.admit", True),
        ("patient.[adt]*", "patient.discharge", True),
        ("patient.[adt]*", "patient.transfer", True),
        ("patient.[adt]*", "patient.pharmacy", False),
        ("patient.[!adt]*", "patient.pharmacy", True),
        ("patient.[!adt]*", "patient.admit", False),
        ("network-query.[a-z]*", "network-query.hie", True),
        ("*", "anything at all", True),
        ("*", "", True),
        ("a+b", "a+b", True),  # regex characters are literal
        ("a+b", "aab", False),
        ("(x)|y", "(x)|y", True),
        ("(x)|y", "y", False),
        ("a\\b", "a\\b", True),
        ("line*", "line\nbreak", True),  # * matches any character, newlines included
        ("*", "multi\nline", True),
        ("x", "x\n", False),  # a trailing newline is not the end of the type
    ],
)
def test_glob_semantics(pattern: str, type_: str, expected: bool) -> None:
    assert matches(pattern, type_) is expected


# -- fan-out, order, default -------------------------------------------------------------------


def test_every_matching_route_fires_in_configuration_order() -> None:
    t = table(
        ("medical.*", ["archive", "ehr"]),
        ("patient.*", ["alerts"]),
        ("*.document-download", ["docs"]),
        ("*", ["audit"]),
        default=("fallback",),
    )
    assert route(t, "medical.document-download") == ("archive", "ehr", "docs", "audit")
    assert route(t, "patient.admit") == ("alerts", "audit")
    assert route(t, "devices.health-data") == ("audit",)


def test_a_sink_named_by_two_routes_gets_the_message_once_at_its_first_place() -> None:
    t = table(
        ("patient.*", ["alerts", "archive"]),
        (["patient.admit", "patient.discharge"], ["archive", "ehr", "alerts"]),
        ("*", ["audit", "archive"]),
    )
    assert route(t, "patient.admit") == ("alerts", "archive", "ehr", "audit")
    assert route(t, "patient.transfer") == ("alerts", "archive", "audit")


def test_a_route_with_several_patterns_fires_once() -> None:
    t = table((["patient.*", "*.admit", "patient.admit"], ["alerts"]))
    assert route(t, "patient.admit") == ("alerts",)


def test_a_single_string_is_one_pattern_and_one_sink() -> None:
    t = table(("patient.admit", "alerts"))
    assert t.routes[0] == Route(("patient.admit",), ("alerts",))
    assert route(t, "patient.admit") == ("alerts",)
    assert route(t, "p") == ()


def test_default_only_when_nothing_matched() -> None:
    t = table(("patient.*", ["alerts"]), default=("archive", "catchall"))
    assert route(t, "patient.admit") == ("alerts",)
    assert route(t, "brand.new-type") == ("archive", "catchall")
    assert route(t, "Patient.admit") == ("archive", "catchall")


def test_a_sink_listed_twice_in_the_default_gets_the_message_once() -> None:
    t = table(("patient.*", ["alerts"]), default=("archive", "audit", "archive"))
    assert route(t, "brand.new-type") == ("archive", "audit")
    assert t.sinks_for("brand.new-type") == ("archive", "audit")


def test_no_default_means_unrouted() -> None:
    t = table(("patient.*", ["alerts"]))
    assert route(t, "brand.new-type") == ()
    assert route(table(), "anything") == ()
    assert route(table(default=("archive",)), "anything") == ("archive",)


def test_sinks_for_agrees_with_route_and_is_stable() -> None:
    t = table(("patient.*", ["alerts", "archive"]), ("*", ["audit"]), default=("x",))
    for type_ in ("patient.admit", "medical.document-download", "", "patient.admit"):
        assert t.sinks_for(type_) == route(t, type_)
    other = table(("patient.*", ["ehr"]))  # a different table is not answered from a cache
    assert other.sinks_for("patient.admit") == ("ehr",)


def test_sink_names_lists_every_sink_named() -> None:
    t = table(("a", ["s1", "s2"]), ("b", "s3"), default=("s4", "s1"))
    assert t.sink_names() == {"s1", "s2", "s3", "s4"}


def test_describe_prints_routes_and_default() -> None:
    t = table((["a.*", "b"], ["s1", "s2"]), default=("s3",))
    assert describe(t) == [("a.*, b", "s1, s2"), ("(default)", "s3")]
    assert describe(table())[-1] == ("(default)", "(none: unrouted)")


# -- properties --------------------------------------------------------------------------------

SINKS = st.sampled_from(["archive", "ehr", "alerts", "audit", "kafka", "slack"])
PATTERN_CHARS = st.sampled_from(list("ab.-*?[]!"))
TYPE_CHARS = st.sampled_from(list("ab.-[]!?*"))
patterns = st.text(PATTERN_CHARS, max_size=6)
types = st.text(TYPE_CHARS, max_size=6)
routes = st.builds(
    Route,
    st.lists(patterns, min_size=1, max_size=3).map(tuple),
    st.lists(SINKS, min_size=1, max_size=4).map(tuple),  # config requires at least one sink
)
tables = st.builds(
    RouteTable, st.lists(routes, max_size=5).map(tuple), st.lists(SINKS, max_size=3).map(tuple)
)


@FAST
@given(tables, types)
def test_a_result_never_names_a_sink_twice(t: RouteTable, type_: str) -> None:
    result = route(t, type_)
    assert len(result) == len(set(result))


@FAST
@given(tables, types)
def test_the_result_is_sinks_of_the_table(t: RouteTable, type_: str) -> None:
    assert set(route(t, type_)) <= t.sink_names()


@FAST
@given(tables, types)
def test_the_result_is_exactly_the_matching_routes_sinks_in_order(
    t: RouteTable, type_: str
) -> None:
    expected: list[str] = []
    for r in t.routes:
        if any(matches(p, type_) for p in r.match):
            expected.extend(s for s in r.to if s not in expected)
    if not expected:
        expected = list(dict.fromkeys(t.default))
    assert route(t, type_) == tuple(expected)
    assert t.sinks_for(type_) == route(t, type_)


@FAST
@given(st.text(max_size=40).filter(lambda s: not set(s) & set("*?[")))
def test_a_literal_pattern_matches_exactly_its_own_type(type_: str) -> None:
    assert matches(type_, type_)
    assert not matches(type_, type_ + "x")
    assert not matches(type_ + "x", type_)


@FAST
@given(st.text(max_size=40).filter(lambda s: not set(s) & set("*?[")), SINKS)
def test_a_route_for_the_literal_type_always_fires(type_: str, sink: str) -> None:
    t = table(("other.*", ["audit"]), (type_, [sink]), default=("fallback",))
    assert sink in route(t, type_)


@FAST
@given(types)
def test_star_matches_everything(type_: str) -> None:
    assert matches("*", type_)
    assert route(table(("*", ["audit"]), default=("x",)), type_) == ("audit",)
