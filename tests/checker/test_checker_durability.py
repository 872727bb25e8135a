"""The set check: acknowledged writes survive everywhere; nothing appears from nowhere."""

from __future__ import annotations

from kmsd.checker import check_acknowledged_present
from kmsd.checker.durability import classify


def test_everything_present_everywhere_passes() -> None:
    acked = {"a", "b"}
    nodes = {"n1": {"a", "b"}, "n2": {"a", "b"}, "n3": {"a", "b"}}
    assert check_acknowledged_present(acked, nodes) == []


def test_a_lost_acknowledged_write_is_reported_per_node() -> None:
    problems = check_acknowledged_present({"a", "b"}, {"n1": {"a", "b"}, "n2": {"a"}})
    assert problems == [
        "node n2 lost 1 acknowledged writes: b",
    ]


def test_phantoms_are_reported() -> None:
    problems = check_acknowledged_present({"a"}, {"n1": {"a", "zzz"}, "n2": {"a", "zzz"}})
    assert len(problems) == 1
    assert "no client attempted" in problems[0] and "zzz" in problems[0]


def test_indeterminate_attempts_may_be_present_or_absent() -> None:
    nodes = {"n1": {"a", "maybe"}, "n2": {"a", "maybe"}}
    assert check_acknowledged_present({"a"}, nodes, attempted={"a", "maybe", "never"}) == []
    result = classify({"a"}, nodes, attempted={"a", "maybe", "never"})
    assert result.recovered == {"maybe"}


def test_attempts_with_unknown_ids_explain_at_most_that_many_elements() -> None:
    nodes = {"n1": {"a", "key-x"}, "n2": {"a", "key-x"}}
    assert check_acknowledged_present({"a"}, nodes, unidentified_attempts=1) == []
    two = {"n1": {"a", "key-x", "key-y"}, "n2": {"a", "key-x", "key-y"}}
    [problem] = check_acknowledged_present({"a"}, two, unidentified_attempts=1)
    assert "2 elements present that no client attempted" in problem


def test_replicas_that_diverge_are_reported() -> None:
    nodes = {"n1": {"a", "maybe"}, "n2": {"a"}}
    [problem] = check_acknowledged_present({"a"}, nodes, attempted={"maybe"})
    assert problem.startswith("node n2 lacks 1 elements other nodes hold")
    assert (
        check_acknowledged_present({"a"}, nodes, attempted={"maybe"}, require_convergence=False)
        == []
    )


def test_no_nodes_is_a_problem() -> None:
    assert check_acknowledged_present({"a"}, {}) == [
        "no node reported its contents, so nothing can be checked"
    ]


def test_long_lists_are_cut_in_messages_but_kept_in_the_classification() -> None:
    acked = {f"k{i:03d}" for i in range(50)}
    [problem] = check_acknowledged_present(acked, {"n1": set()})
    assert "... (30 more)" in problem
    assert classify(acked, {"n1": set()}).lost == {"n1": frozenset(acked)}
