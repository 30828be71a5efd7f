"""Where `centernet-ray serve` listens: an address its HTTP proxy could not bind is refused before
Serve starts (`launch.check_port_free`; run by `start_app` when this command's own Ray has no proxy
yet), in one line that says what to change. No Ray: the check is the socket's."""

import socket

import pytest

from centernet_ray.errors import UserInputError
from centernet_ray.ray_serve.launch import check_port_free


def test_a_port_another_program_listens_on_is_refused_and_a_free_one_is_not():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(UserInputError, match=f"^cannot serve on 127.0.0.1:{port}: Address already in use: another "
                                                 r"program listens there: give another --port \(serve.port\), or stop it$"):
            check_port_free("127.0.0.1", port)
        with pytest.raises(UserInputError, match=f"^cannot serve on localhost:{port}: Address already in use"):
            check_port_free("localhost", port)  # a name is bound as IPv4, as Serve's proxy binds it
    check_port_free("127.0.0.1", port)  # closed: free again (SO_REUSEADDR, as the proxy binds)


def test_a_host_that_is_not_this_machine_s_is_refused_naming_the_setting():
    with pytest.raises(UserInputError, match=r"^cannot serve on nosuchhost.invalid:8000: .*: give --host \(serve.host\) "
                                             r"an address or name of this machine \(0.0.0.0 for all of its addresses\)$"):
        check_port_free("nosuchhost.invalid", 8000)  # .invalid never resolves (RFC 6761)
    with socket.socket() as plain:  # TEST-NET-1 (RFC 5737): no machine's address, unless this one binds any
        binds_any = _binds("192.0.2.1", plain)  # (net.ipv4.ip_nonlocal_bind)
    if not binds_any:
        with pytest.raises(UserInputError, match=r"^cannot serve on 192.0.2.1:8000: Cannot assign requested address: "
                                                 r"no address of this machine: give --host \(serve.host\) one of its "
                                                 "addresses"):
            check_port_free("192.0.2.1", 8000)


def _binds(host: str, sock: socket.socket) -> bool:
    try:
        sock.bind((host, 0))
    except OSError:
        return False
    return True
