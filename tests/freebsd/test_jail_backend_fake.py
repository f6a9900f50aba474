"""The FreeBSD jail backend against a fake libc that records every call.

This machine cannot run FreeBSD, so these check the exact parameters, flags
and call order against jail(2), jail_set(2) via libjail(3), nmount(2),
rctl_add_rule(2) and procctl(2) as their man pages describe them, and that
each error (EPERM, EEXIST, EINVAL, ENOSYS) gives a message naming the jail
and the cause. The behavioural suite runs for real inside the FreeBSD
Vagrant box (vagrant/freebsd).
"""

from __future__ import annotations

import errno
import os

import pytest

from bedrock.config import load
from jails import JailError
from jails.freebsd import (
    JAIL_ATTACH,
    JAIL_CREATE,
    PROC_PDEATHSIG_CTL,
    PROC_REAP_ACQUIRE,
    FreeBSDBackend,
    JailParam,
)


class FakeLibc:
    """Records calls; each can be told to fail with an errno (and libjail message)."""

    def __init__(self, fail: dict[str, tuple[int, str]] | None = None, jid: int = 7, existing: dict[str, int] | None = None):
        self.calls: list[tuple] = []
        self.fail = fail or {}
        self.jid = jid
        self.existing = existing or {}
        self._errno = 0
        self._errmsg = ""

    def _result(self, name: str, ok):
        if name in self.fail:
            self._errno, self._errmsg = self.fail[name]
            return -1
        return ok

    def errno(self) -> int:
        return self._errno

    def errmsg(self) -> str:
        return self._errmsg

    def jail_set(self, params, flags):
        self.calls.append(("jail_set", list(params), flags))
        return self._result("jail_set", self.jid)

    def jail_getid(self, name):
        self.calls.append(("jail_getid", name))
        if name in self.existing:
            return self.existing[name]
        self._errno, self._errmsg = errno.ENOENT, f"jail \"{name}\" not found"
        return -1

    def jail_attach(self, jid):
        self.calls.append(("jail_attach", jid))
        return self._result("jail_attach", 0)

    def jail_remove(self, jid):
        self.calls.append(("jail_remove", jid))
        return self._result("jail_remove", 0)

    def nmount(self, options, flags):
        self.calls.append(("nmount", list(options), flags))
        return self._result("nmount", 0)

    def rctl_add_rule(self, rule):
        self.calls.append(("rctl_add_rule", rule))
        return self._result("rctl_add_rule", 0)

    def rctl_remove_rule(self, rule_filter):
        self.calls.append(("rctl_remove_rule", rule_filter))
        return 0

    def procctl(self, command, value):
        self.calls.append(("procctl", command, value))
        return 0


@pytest.fixture
def rootfs(tmp_path):
    root = tmp_path / "jails" / "web"
    (root / "dev").mkdir(parents=True)
    return root


@pytest.fixture
def no_chdir(monkeypatch):
    """The backend chdirs to / inside the jail; not in this test process."""
    monkeypatch.setattr(os, "chdir", lambda path: None)


def config_for(tmp_path, text: str):
    path = tmp_path / "web.ini"
    path.write_text("[uwsgi]\n" + text)
    return load(str(path))


def test_create_jail_exact_parameters_and_order(tmp_path, rootfs, no_chdir, monkeypatch):
    monkeypatch.setenv("UWSGI_VASSAL_NAME", "web.ini")
    jidfile = tmp_path / "web.jid"
    config = config_for(tmp_path, f"jail = {rootfs} web.example\njail-ip4 = 198.18.0.10\njail-ip4 = 198.18.0.11\n"
                                  "jail-ip6 = 2001:db8::10\njail2 = allow.raw_sockets\njail2 = children.max=0\n"
                                  f"jidfile = {jidfile}\nmemory-limit = 256M\npids-limit = 64\ncpu-limit = 1.5\n")
    fake = FakeLibc(jid=42)
    backend = FreeBSDBackend(fake)
    assert backend.refused(config) == []
    assert backend.isolate(config) is None
    assert fake.calls == [
        # rctl first: a jailed process may not add rules, and rules may name a jail before it exists.
        ("rctl_add_rule", "jail:web:memoryuse:deny=268435456"),
        ("rctl_add_rule", "jail:web:maxproc:deny=64"),
        ("rctl_add_rule", "jail:web:pcpu:deny=150"),
        ("nmount", [("fstype", "devfs"), ("fspath", f"{rootfs}/dev"), ("ruleset", "4")], 0),
        ("jail_set", [
            ("path", str(rootfs)),
            ("host.hostname", "web.example"),
            ("name", "web"),
            ("ip4.addr", "198.18.0.10,198.18.0.11"),
            ("ip6.addr", "2001:db8::10"),
            ("enforce_statfs", "2"),
            ("devfs_ruleset", "4"),
            ("allow.raw_sockets", None),  # a boolean: no value (libjail sends it without one)
            ("children.max", "0"),
        ], JAIL_CREATE | JAIL_ATTACH),
    ]
    assert jidfile.read_text() == "42\n"


def test_jail_name_and_hostname_defaults_and_user_overrides(tmp_path, rootfs, no_chdir, monkeypatch):
    monkeypatch.setenv("UWSGI_VASSAL_NAME", "shop.v2.ini")
    config = config_for(tmp_path, f"jail = {rootfs}\njail2 = enforce_statfs=1\njail2 = devfs_ruleset=5\njail2 = vnet\n")
    fake = FakeLibc()
    FreeBSDBackend(fake).isolate(config)
    (nmount,) = [c for c in fake.calls if c[0] == "nmount"]
    assert ("ruleset", "5") in nmount[1]  # the user's ruleset is the one devfs is mounted with
    (jail_set,) = [c for c in fake.calls if c[0] == "jail_set"]
    params = dict(jail_set[1])
    assert params["name"] == "shop_v2"  # a dot would mean a child jail of "shop"
    assert params["host.hostname"] == "shop_v2"
    assert [k for k, _ in jail_set[1]].count("enforce_statfs") == 1 and params["enforce_statfs"] == "1"
    assert params["vnet"] is None
    assert not any(c[0] == "rctl_add_rule" for c in fake.calls)


def test_devfs_already_mounted_is_not_mounted_again(tmp_path, rootfs, no_chdir, monkeypatch):
    monkeypatch.setattr(os.path, "ismount", lambda path: path == f"{rootfs}/dev")
    fake = FakeLibc()
    FreeBSDBackend(fake).isolate(config_for(tmp_path, f"jail = {rootfs}\n"))
    assert [c[0] for c in fake.calls] == ["jail_set"]


def test_jail_attach_by_name_and_by_jid(tmp_path, no_chdir):
    fake = FakeLibc(existing={"db": 12})
    backend = FreeBSDBackend(fake)
    backend.isolate(config_for(tmp_path, "jail-attach = db\n"))
    assert fake.calls == [("jail_getid", "db"), ("jail_attach", 12)]
    fake.calls.clear()
    backend.isolate(config_for(tmp_path, "jail-attach = 33\n"))
    assert fake.calls == [("jail_attach", 33)]


@pytest.mark.parametrize("call,code,message,expected", [
    ("jail_set", errno.EPERM, "jail_set: Operation not permitted", "jail web: jail_set: not permitted (the emperor must run as root"),
    ("jail_set", errno.EEXIST, "jail 5 already exists", "jail web: jail_set: a jail with that name already exists"),
    ("jail_set", errno.EINVAL, "ip4.addr: not an IPv4 address: 1.2.3", "jail web: jail_set: invalid parameter (ip4.addr: not an IPv4 address: 1.2.3)"),
    ("nmount", errno.EPERM, "", "mounting devfs on"),
    ("rctl_add_rule", errno.ENOSYS, "", "rctl rule jail:web:memoryuse:deny=1048576: rctl is off: set kern.racct.enable=1"),
])
def test_errors_name_the_jail_and_the_cause(tmp_path, rootfs, no_chdir, monkeypatch, call, code, message, expected):
    monkeypatch.setenv("UWSGI_VASSAL_NAME", "web.ini")
    fake = FakeLibc(fail={call: (code, message)})
    with pytest.raises(JailError) as exc:
        FreeBSDBackend(fake).isolate(config_for(tmp_path, f"jail = {rootfs}\nmemory-limit = 1M\n"))
    assert expected in str(exc.value)
    assert fake.calls[-1][0] == call  # nothing after the failing call


def test_attach_to_missing_jail(tmp_path, no_chdir):
    with pytest.raises(JailError, match=r"jail-attach ghost: no such jail or parameter \(jail \"ghost\" not found\)"):
        FreeBSDBackend(FakeLibc()).isolate(config_for(tmp_path, "jail-attach = ghost\n"))


def test_missing_dev_directory(tmp_path, no_chdir):
    root = tmp_path / "bare"
    root.mkdir()
    fake = FakeLibc()
    with pytest.raises(JailError, match="does not exist"):
        FreeBSDBackend(fake).isolate(config_for(tmp_path, f"jail = {root}\n"))
    assert fake.calls == []


def test_refused_keys_name_file_and_line(tmp_path):
    config = config_for(tmp_path, "unshare = net\ntuntap-device = t0\njail-ip4 = 198.18.0.1\nmemory-limit = 1G\n")
    problems = {p.key: str(p) for p in FreeBSDBackend(FakeLibc()).refused(config)}
    assert "web.ini:2" in problems["unshare"] and "Linux only" in problems["unshare"]
    assert "web.ini:3" in problems["tuntap-device"]
    assert "jail-ip4 needs jail" in problems["jail-ip4"]
    assert "web.ini:5" in problems["memory-limit"] and "rctl limits apply to the vassal's jail" in problems["memory-limit"]
    assert not FreeBSDBackend.limits_in_cgroups  # the emperor makes no cgroup for them there


def test_teardown_removes_jail_then_rules(tmp_path, monkeypatch):
    config = config_for(tmp_path, "jail = /usr/jails/web\nmemory-limit = 1M\n")
    fake = FakeLibc(existing={"web": 9})
    FreeBSDBackend(fake).teardown(config, "web.ini")
    assert fake.calls == [("jail_getid", "web"), ("jail_remove", 9), ("rctl_remove_rule", "jail:web")]


def test_process_controls():
    fake = FakeLibc()
    backend = FreeBSDBackend(fake)
    assert backend.become_subreaper()
    backend.die_with_parent(15)
    assert fake.calls == [("procctl", PROC_REAP_ACQUIRE, None), ("procctl", PROC_PDEATHSIG_CTL, 15)]


def test_jailparam_struct_matches_jail_h():
    # struct jailparam of lib/libjail/jail.h on LP64: 2 pointers, 2 size_t, 3 ints (+ padding).
    assert [name for name, _ in JailParam._fields_] == [
        "jp_name", "jp_value", "jp_valuelen", "jp_elemlen", "jp_ctltype", "jp_structtype", "jp_flags"]
    assert JailParam.jp_ctltype.offset == 32 and JailParam.jp_flags.offset == 40
    import ctypes
    assert ctypes.sizeof(JailParam) == 48


def test_describe_for_status(tmp_path):
    fake = FakeLibc(existing={"web": 4})
    backend = FreeBSDBackend(fake)
    assert backend.describe(config_for(tmp_path, "jail = /usr/jails/web\n"), "web.ini") == {"name": "web", "jid": 4}
    assert backend.describe(config_for(tmp_path, "jail = /usr/jails/x\n"), "gone.ini") == {"name": "gone", "jid": None}
    assert backend.describe(config_for(tmp_path, "wsgi-file = a.py\n"), "plain.ini") is None


def test_hook_mounts_and_hostname():
    fake = FakeLibc()
    fake.unmount = lambda target, flags: fake.calls.append(("unmount", target, flags)) or 0
    fake.sethostname = lambda name: fake.calls.append(("sethostname", name)) or 0
    backend = FreeBSDBackend(fake)
    backend.mount("none", "/usr/local/www", "/usr/jails/web/www", ["bind", "ro"])
    backend.mount("tmpfs", "none", "/usr/jails/web/tmp", ["nosuid", "noexec"])
    backend.umount("/usr/jails/web/tmp", ["force"])
    backend.sethostname("web")
    assert fake.calls == [
        ("nmount", [("fstype", "nullfs"), ("fspath", "/usr/jails/web/www"), ("from", "/usr/local/www")], 0x1),
        ("nmount", [("fstype", "tmpfs"), ("fspath", "/usr/jails/web/tmp")], 0x4 | 0x8),
        ("unmount", "/usr/jails/web/tmp", 0x80000),
        ("sethostname", "web"),
    ]
    with pytest.raises(JailError, match="mount flag 'private' has no FreeBSD equivalent"):
        backend.mount("none", "/a", "/b", ["bind", "private"])
    with pytest.raises(JailError, match="umount flag 'lazy': use force or detach"):
        backend.umount("/b", ["lazy"])


def test_privilege_drop_sets_no_new_privs_first(monkeypatch):
    from jails.freebsd import PROC_NO_NEW_PRIVS_CTL, PROC_NO_NEW_PRIVS_ENABLE

    order = []
    fake = FakeLibc()
    monkeypatch.setattr("jails.freebsd.drop_to", lambda uid, gid, name: order.append(("drop_to", uid, gid, name)))
    FreeBSDBackend(fake).drop_privileges(1001, 1001, "www")
    assert fake.calls == [("procctl", PROC_NO_NEW_PRIVS_CTL, PROC_NO_NEW_PRIVS_ENABLE)]
    assert order == [("drop_to", 1001, 1001, "www")]


def test_peer_credentials_from_xucred():
    import struct

    from jails.freebsd import LOCAL_PEERCRED, SOL_LOCAL, XUCRED_PID_OFFSET, XUCRED_SIZE

    assert (XUCRED_PID_OFFSET, XUCRED_SIZE) == (80, 88)  # amd64: 76 bytes, the union aligned to 8

    class Sock:
        def getsockopt(self, level, name, size):
            assert (level, name, size) == (SOL_LOCAL, LOCAL_PEERCRED, XUCRED_SIZE)
            data = struct.pack("=IIh2x16I", 0, 1001, 2, 1002, 5, *([0] * 14))
            return data + bytes(XUCRED_PID_OFFSET - len(data)) + struct.pack("=i4x", 4242)

    assert FreeBSDBackend(FakeLibc()).peer_credentials(Sock()) == (4242, 1001, 1002)
