"""The set check: every acknowledged write survives on every node (Jepsen's set checker).

After a chaos run the test heals every fault, restarts all nodes, waits for a leader
and reads the full set of keys from each node. Then, per element:

* lost: acknowledged but missing on some node. Must never happen.
* phantom: present but never attempted by any client. Must never happen.
* recovered: attempted, never acknowledged (indeterminate), yet present. Allowed.
* diverged: present on some nodes and not others once everything is healed; the
  replicas have not converged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass

# Long element lists are cut in problem messages; the `SetCheck` fields keep them all.
_SHOWN = 20


@dataclass(frozen=True)
class SetCheck:
    """The classification behind `check_acknowledged_present`'s problems."""

    lost: dict[str, frozenset[str]]
    phantoms: frozenset[str]
    unexplained_phantoms: frozenset[str]
    recovered: frozenset[str]
    diverged: dict[str, frozenset[str]]
    problems: tuple[str, ...]


def _show(elements: Iterable[str]) -> str:
    ordered = sorted(elements)
    text = ", ".join(ordered[:_SHOWN])
    return text + (f", ... ({len(ordered) - _SHOWN} more)" if len(ordered) > _SHOWN else "")


def classify(
    acknowledged: Set[str],
    present_on_each_node: Mapping[str, Set[str]],
    *,
    attempted: Iterable[str] | None = None,
    unidentified_attempts: int = 0,
    require_convergence: bool = True,
) -> SetCheck:
    """Classifies every element; see `check_acknowledged_present` for the arguments."""
    tried = set(acknowledged) | (set(attempted) if attempted is not None else set())
    problems: list[str] = []
    if not present_on_each_node:
        problems.append("no node reported its contents, so nothing can be checked")

    lost: dict[str, frozenset[str]] = {}
    for node, present in sorted(present_on_each_node.items()):
        missing = frozenset(acknowledged - present)
        if missing:
            lost[node] = missing
            problems.append(
                f"node {node} lost {len(missing)} acknowledged writes: {_show(missing)}"
            )

    everywhere: set[str] = set()
    for present in present_on_each_node.values():
        everywhere |= present
    phantoms = frozenset(everywhere - tried)
    # A create whose answer was lost has a server-chosen id the test never learned;
    # each such attempt can explain one otherwise unknown element, and no more.
    unexplained = phantoms if len(phantoms) > unidentified_attempts else frozenset()
    if unexplained:
        problems.append(
            f"{len(phantoms)} elements present that no client attempted "
            f"(at most {unidentified_attempts} can come from attempts with unknown ids): "
            f"{_show(phantoms)}"
        )
    recovered = frozenset((everywhere & tried) - acknowledged)

    diverged: dict[str, frozenset[str]] = {}
    if require_convergence:
        for node, present in sorted(present_on_each_node.items()):
            # Acknowledged elements missing here are already reported as lost.
            absent = frozenset(everywhere - present - acknowledged)
            if absent:
                diverged[node] = absent
                problems.append(
                    f"node {node} lacks {len(absent)} elements other nodes hold "
                    f"(replicas diverge): {_show(absent)}"
                )
    return SetCheck(lost, phantoms, unexplained, recovered, diverged, tuple(problems))


def check_acknowledged_present(
    acknowledged: set[str],
    present_on_each_node: dict[str, set[str]],
    *,
    attempted: Iterable[str] | None = None,
    unidentified_attempts: int = 0,
    require_convergence: bool = True,
) -> list[str]:
    """Problems with the final contents of the nodes; an empty list means it passed.

    `acknowledged`: elements whose write a client saw succeed.
    `present_on_each_node`: node name -> the elements it holds after healing.
    `attempted`: every element any client tried to write, acknowledged or not
    (defaults to `acknowledged`); anything present outside it is a phantom.
    `unidentified_attempts`: indeterminate attempts whose element the client never
    learned (a lost CreateKey answer); that many phantoms are tolerated.
    `require_convergence`: also report elements some nodes hold and others lack.
    """
    return list(
        classify(
            acknowledged,
            present_on_each_node,
            attempted=attempted,
            unidentified_attempts=unidentified_attempts,
            require_convergence=require_convergence,
        ).problems
    )
