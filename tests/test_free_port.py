"""Test servers get ports that no other process is handed by the kernel meanwhile."""

from __future__ import annotations

import socket

import pytest

from benchmarks import servers
from benchmarks.servers import free_port


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range():
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(20000 <= port < servers._ephemeral_ports_from() for port in ports)
    for port in ports[:5]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_in_use_is_never_handed_out(monkeypatch):
    first, end = servers._FIXED_PORTS_FROM, servers._FIXED_PORTS_FROM + 1000
    monkeypatch.setattr(servers, "_ephemeral_ports_from", lambda: end)
    monkeypatch.setattr(servers, "_handed_out", set())
    with socket.socket() as holder:
        for port in range(first, end):
            try:
                holder.bind(("127.0.0.1", port))
                break
            except OSError:
                continue
        holder.listen()
        taken = holder.getsockname()[1]
        handed_out = []
        with pytest.raises(RuntimeError, match="no free port"):
            while True:
                handed_out.append(free_port())
    assert taken not in handed_out
    assert len(handed_out) == len(set(handed_out)) > 900
