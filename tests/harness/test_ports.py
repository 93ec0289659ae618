"""free_ports never hands out a port twice in a short while (the demo starts both stores'
clusters at once: a node failed with "address in use" in CI)."""

from __future__ import annotations

from harness.cluster import free_ports


def test_ports_handed_out_are_not_handed_out_again() -> None:
    seen: set[int] = set()
    for _ in range(50):
        ports = free_ports(12)
        assert len(set(ports)) == 12
        assert not seen & set(ports), "a port was handed out twice"
        seen |= set(ports)
