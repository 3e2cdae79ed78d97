"""The split server's port: bound by the supervisor on every address a name resolves to,
and taken over by each front-end from the file descriptors it inherits."""

import socket

import pytest

from service import supervisor


def _can_bind_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def _resolving_to(monkeypatch, *addresses: tuple[socket.AddressFamily, tuple]) -> None:
    """`socket.getaddrinfo` answering every name with `addresses`, in order."""

    def getaddrinfo(host, port, *args, **kwargs):
        return [(family, socket.SOCK_STREAM, 6, "", address) for family, address in addresses]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.mark.skipif(not _can_bind_ipv6_loopback(), reason="no IPv6 loopback here")
def test_a_name_with_two_addresses_binds_both_once_each(monkeypatch):
    """`localhost` may resolve to 127.0.0.1 and ::1 (and list one twice): uvicorn in one
    process listens on each, so the split server does too."""
    v4 = (socket.AF_INET, ("127.0.0.1", 0))
    v6 = (socket.AF_INET6, ("::1", 0, 0, 0))
    _resolving_to(monkeypatch, v4, v6, v4)
    listeners = supervisor.bind_listening_sockets("localhost", 0)
    try:
        assert [s.family for s in listeners] == [socket.AF_INET, socket.AF_INET6]
        for listener in listeners:
            assert listener.get_inheritable()
            with socket.socket(listener.family) as client:  # it accepts connections
                client.settimeout(5)
                client.connect(listener.getsockname())
            assert listener.family != socket.AF_INET6 or listener.getsockopt(
                socket.IPPROTO_IPV6, socket.IPV6_V6ONLY
            )
    finally:
        for listener in listeners:
            listener.close()


def test_an_address_that_cannot_be_bound_fails_the_bind_and_frees_the_others(monkeypatch):
    """203.0.113.1 (documentation range) is no address of this machine: the whole bind
    fails, and the socket already bound on 127.0.0.1 is closed, not leaked."""
    opened: list[socket.socket] = []
    real_socket = socket.socket

    class RecordedSocket(real_socket):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            opened.append(self)

    _resolving_to(
        monkeypatch, (socket.AF_INET, ("127.0.0.1", 0)), (socket.AF_INET, ("203.0.113.1", 0))
    )
    monkeypatch.setattr(socket, "socket", RecordedSocket)
    with pytest.raises(OSError):
        supervisor.bind_listening_sockets("two-addresses.example", 0)
    assert len(opened) == 2
    assert all(sock.fileno() == -1 for sock in opened)  # both closed


def test_a_front_end_takes_over_every_socket_it_inherits(monkeypatch):
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    names = [listener.getsockname() for listener in listeners]
    monkeypatch.setenv(supervisor.LISTEN_FD_ENV, ",".join(str(s.fileno()) for s in listeners))
    for listener in listeners:
        listener.detach()  # the descriptors now belong to whoever takes them over
    inherited = supervisor.inherited_listening_sockets()
    try:
        assert [sock.getsockname() for sock in inherited] == names
    finally:
        for sock in inherited:
            sock.close()


def test_an_address_family_this_host_cannot_open_is_skipped(monkeypatch):
    """As asyncio does for uvicorn in one process: a host with IPv6 turned off may still
    resolve `localhost` to ::1 as well; the family it cannot open a socket in is skipped."""
    unsupported = 9999  # no such address family: socket() fails with EAFNOSUPPORT
    _resolving_to(monkeypatch, (unsupported, ("::1", 0)), (socket.AF_INET, ("127.0.0.1", 0)))
    listeners = supervisor.bind_listening_sockets("localhost", 0)
    try:
        assert [s.getsockname()[0] for s in listeners] == ["127.0.0.1"]
    finally:
        for listener in listeners:
            listener.close()
    _resolving_to(monkeypatch, (unsupported, ("::1", 0)))
    with pytest.raises(OSError, match="no socket can be opened"):
        supervisor.bind_listening_sockets("localhost", 0)


def test_an_empty_host_binds_every_interface():
    listeners = supervisor.bind_listening_sockets("", 0)
    try:
        assert listeners
        assert {s.getsockname()[0] for s in listeners} <= {"0.0.0.0", "::"}
    finally:
        for listener in listeners:
            listener.close()


def test_a_failure_after_the_port_is_bound_reaches_the_caller_and_closes_the_port(monkeypatch):
    """The supervisor cannot make its private directory: the caller gets that error (exit 2
    with its message), the port is given back and the signal handlers are restored."""
    import signal

    from service.config import ServiceSettings
    from service.errors import ConfigError

    bound: list[socket.socket] = []
    bind = supervisor.bind_listening_sockets

    def recording_bind(host: str, port: int) -> list[socket.socket]:
        bound.extend(bind(host, port))
        return bound

    def no_directory():
        raise ConfigError("cannot make a private directory for the processes: disk full")

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    monkeypatch.setattr(supervisor, "_check_config", lambda settings: None)
    monkeypatch.setattr(supervisor, "bind_listening_sockets", recording_bind)
    monkeypatch.setattr(supervisor, "_shared_directory", no_directory)
    settings = ServiceSettings(host="127.0.0.1", port=0, front_ends=2)
    with pytest.raises(ConfigError, match="disk full"):
        supervisor.supervise(settings, child_command=["false"])
    assert bound and all(sock.fileno() == -1 for sock in bound)
    assert {s: signal.getsignal(s) for s in handlers} == handlers
