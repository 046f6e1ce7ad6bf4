import pytest

from consoleproxy.errors import Forbidden, SessionLimit
from consoleproxy.policy.sessions import Registry, Session
from consoleproxy.policy.targets import TargetPolicy
from consoleproxy.protocol.query import raw_query_param


def test_raw_query_keeps_plus_slash_equals() -> None:
    qs = "autoconnect=true&port=8443&token=ab+c/d==&extra=x"
    assert raw_query_param(qs, "token") == "ab+c/d=="
    assert raw_query_param(qs, "extra") == "x"
    assert raw_query_param(qs, "missing") is None
    # percent-encoding is decoded, but '+' stays a plus
    assert raw_query_param("token=a%2Bb+c", "token") == "a+b+c"
    assert raw_query_param("tokenx=1&token=2", "token") == "2"


def test_raw_query_bad_percent() -> None:
    with pytest.raises(UnicodeDecodeError):
        raw_query_param("token=%ff", "token")


POLICY = TargetPolicy.from_config(["10.0.0.0/8", "127.0.0.1/32"], "5900-6999")


def test_targets_allowed() -> None:
    assert str(POLICY.check("10.1.2.3", 5901)) == "10.1.2.3"
    assert str(POLICY.check("127.0.0.1", 5900)) == "127.0.0.1"  # listed explicitly


@pytest.mark.parametrize(
    ("host", "port", "why"),
    [
        ("192.168.1.1", 5900, "outside the allowed hypervisor networks"),
        ("10.0.0.1", 22, "outside the allowed VNC ports"),
        ("127.0.0.2", 5900, "outside"),
        ("169.254.169.254", 5900, "outside"),
        ("hypervisor.example", 5900, "not an IP address"),
    ],
)
def test_targets_refused(host: str, port: int, why: str) -> None:
    with pytest.raises(Forbidden, match=why):
        POLICY.check(host, port)


def test_special_addresses_need_explicit_listing() -> None:
    wide = TargetPolicy.from_config(["0.0.0.0/0"], "1-65535")
    for special in ("127.0.0.1", "169.254.169.254", "0.0.0.0"):
        with pytest.raises(Forbidden, match="loopback, link-local"):
            wide.check(special, 5900)
    assert str(wide.check("::ffff:10.0.0.1", 5900)) == "10.0.0.1"


def mk(vm: str = "vm1", ip: str = "1.1.1.1") -> Session:
    return Session(vm=vm, client_ip=ip, host="10.0.0.1", port=5900)


def test_registry_total_limit() -> None:
    r = Registry(max_sessions=2)
    r.add(mk("a"))
    r.add(mk("b"))
    with pytest.raises(SessionLimit, match="limit of 2 consoles"):
        r.add(mk("c"))


def test_registry_per_ip_and_release() -> None:
    r = Registry(max_sessions=10, max_per_client_ip=1)
    s = mk("a")
    r.add(s)
    with pytest.raises(SessionLimit, match=r"client 1\.1\.1\.1"):
        r.add(mk("b"))
    r.add(mk("b", ip="2.2.2.2"))
    r.remove(s)
    r.add(mk("c"))  # slot released
    assert len(r) == 2


def test_registry_vm_policies() -> None:
    share = Registry(max_sessions=10, max_per_vm=2)
    share.add(mk())
    share.add(mk())
    with pytest.raises(SessionLimit, match="VM vm1 has reached its limit of 2"):
        share.add(mk())

    reject = Registry(max_sessions=10, per_vm_policy="reject")
    reject.add(mk())
    with pytest.raises(SessionLimit, match="already has an open console"):
        reject.add(mk())

    replace = Registry(max_sessions=10, per_vm_policy="replace")
    first = mk()
    assert replace.add(first) == []
    assert replace.add(mk()) == [first]
