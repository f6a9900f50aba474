"""Each control verb's validation and rights, in process (issue 13): the
same ``commands.execute`` the control socket and the signals use, on an
emperor stub whose vassals record what they were asked."""

from __future__ import annotations

import pytest

from emperor import commands
from emperor.commands import REFUSED, USAGE, VERBS, CommandError, Peer

ROOT = Peer.root()
ALICE = Peer(1000, 1000, 4242)
BOB = Peer(1001, 1001, 4243)


class Log:
    def __init__(self) -> None:
        self.not_echoed = 0

    def tail(self, count: int) -> list[str]:
        return [f"line {n}" for n in range(count)][-count:] if count else []


class StubVassal:
    def __init__(self, name: str, owner: tuple[int, int] | None, tyrant: bool, config: object | None = object()):
        self.name = name
        self.owner = owner
        self.config = config
        self.error = None if config is not None else "x.ini:1: bad"
        self.launcher = type("L", (), {"tyrant": tyrant})()
        self.log = Log()
        self.asked: list[str] = []

    def reload(self) -> bool:
        self.asked.append("reload")
        return True

    def hold(self) -> None:
        self.asked.append("hold")

    def restart(self) -> None:
        self.asked.append("restart")

    def start_now(self) -> None:
        self.asked.append("start")

    def reset(self) -> None:
        self.asked.append("reset")


class StubEmperor:
    def __init__(self, tyrant: bool = True) -> None:
        self.tyrant = tyrant
        self.control = None
        self.vassals = {
            "a.ini": StubVassal("a.ini", (1000, 1000), tyrant),
            "a2.ini": StubVassal("a2.ini", (1000, 1000), tyrant, config=None),
            "b.ini": StubVassal("b.ini", (1001, 1001), tyrant),
        }
        self.logged: list[str] = []
        self.down = False

    def status(self, names=None, peer=None) -> dict:
        shown = [v for n, v in sorted(self.vassals.items()) if (not names or n in names) and (peer is None or peer.may_see(v))]
        return {"emperor": {}, "vassals": [{"name": v.name, "state": "ready", "pid": 1, "restarts": 0, "loyal": False,
                                            "rss_bytes": 0, "error": None} for v in shown]}

    def shutdown(self) -> None:
        self.down = True

    def log(self, message: str) -> None:
        self.logged.append(message)

    def router_stats(self) -> dict:
        return {"running": False}


@pytest.fixture(autouse=True)
def stub_status(monkeypatch):
    """The status document is reporting's (tested with a real emperor in
    tests/integration); here only which vassals it names matters."""
    from emperor import reporting

    monkeypatch.setattr(reporting, "status_document", lambda emperor, names=None, peer=None: emperor.status(names, peer))


def run(emperor: StubEmperor, verb: str, args: dict, peer: Peer = ROOT):
    return commands.execute(emperor, verb, args, peer)


def refused(emperor: StubEmperor, verb: str, args: dict, peer: Peer = ROOT) -> CommandError:
    with pytest.raises(CommandError) as caught:
        run(emperor, verb, args, peer)
    return caught.value


def test_an_unknown_verb_is_a_usage_error_naming_the_known_ones():
    error = refused(StubEmperor(), "frobnicate\x1b[2K", {})
    assert error.code == USAGE and "frobnicate" in str(error) and "\x1b" not in str(error) and "status" in str(error)


@pytest.mark.parametrize("verb", [v for v in VERBS if v != "help"])
def test_outside_tyrant_mode_only_root_may_ask(verb):
    error = refused(StubEmperor(tyrant=False), verb, {"names": ["a.ini"]}, ALICE)
    assert error.code == REFUSED and str(error) == "not permitted"


def test_help_is_for_everyone_and_documents_each_verb():
    result = run(StubEmperor(tyrant=False), "help", {}, ALICE)
    assert set(result) == set(VERBS) and all(result.values())
    assert set(run(StubEmperor(), "help", {"names": ["logs"]}, ALICE)) == {"logs"}


@pytest.mark.parametrize("names", ["a.ini", [1], [None], {"a.ini": 1}, [["a.ini"]]])
def test_names_must_be_a_list_of_strings(names):
    error = refused(StubEmperor(), "reload", {"names": names})
    assert error.code == USAGE and "'names'" in str(error)


@pytest.mark.parametrize(("verb", "hint"), [("reload", " (or --all)"), ("restart", " (or --all)"), ("reset", " (or --all)"),
                                            ("stop", ""), ("start", ""), ("logs", "")])
def test_a_verb_on_vassals_wants_a_name(verb, hint):
    error = refused(StubEmperor(), verb, {})
    assert error.code == USAGE and str(error) == "name at least one vassal" + hint


def test_stop_and_start_take_no_all():
    emperor = StubEmperor()
    assert refused(emperor, "stop", {"all": True}).code == USAGE
    assert all(not v.asked for v in emperor.vassals.values())


@pytest.mark.parametrize(("verb", "asked"), [("reload", "reload"), ("stop", "hold"), ("start", "start"),
                                             ("restart", "restart"), ("reset", "reset")])
def test_each_verb_asks_the_named_vassal_only(verb, asked):
    emperor = StubEmperor()
    run(emperor, verb, {"names": ["a.ini"]})
    assert emperor.vassals["a.ini"].asked == [asked]
    assert emperor.vassals["b.ini"].asked == []


def test_a_tenant_acts_on_its_own_vassals_only_and_learns_nothing_of_others():
    emperor = StubEmperor()
    run(emperor, "reload", {"names": ["a.ini"]}, ALICE)
    theirs = refused(emperor, "reload", {"names": ["b.ini"]}, ALICE)
    missing = refused(emperor, "reload", {"names": ["nope.ini"]}, ALICE)
    assert str(theirs).replace("b.ini", "X") == str(missing).replace("nope.ini", "X")
    assert emperor.vassals["b.ini"].asked == []
    assert run(emperor, "reload", {"all": True}, ALICE) == {"reloaded": ["a.ini", "a2.ini"], "skipped": []}
    assert emperor.vassals["b.ini"].asked == []
    assert [v["name"] for v in run(emperor, "status", {}, BOB)["vassals"]] == ["b.ini"]
    assert refused(emperor, "status", {"names": ["a.ini"]}, BOB).code == REFUSED


def test_one_bad_name_refuses_the_whole_request():
    emperor = StubEmperor()
    refused(emperor, "restart", {"names": ["a.ini", "nope.ini"]})
    assert emperor.vassals["a.ini"].asked == []


def test_start_and_restart_refuse_an_invalid_config_before_touching_any():
    emperor = StubEmperor()
    for verb in ("start", "restart"):
        error = refused(emperor, verb, {"names": ["a.ini", "a2.ini"]})
        assert "a2.ini: config invalid: x.ini:1: bad" in str(error)
    assert emperor.vassals["a.ini"].asked == []


@pytest.mark.parametrize("lines", [-1, "10", 1.5, None, True])
def test_logs_wants_a_non_negative_count(lines):
    assert refused(StubEmperor(), "logs", {"names": ["a.ini"], "lines": lines}).code == USAGE


def test_logs_takes_exactly_one_vassal():
    assert refused(StubEmperor(), "logs", {"names": ["a.ini", "b.ini"]}).code == USAGE
    result = run(StubEmperor(), "logs", {"names": ["a.ini"], "lines": 3})
    assert result == {"name": "a.ini", "lines": ["line 0", "line 1", "line 2"], "omitted": 0, "follow": False}


@pytest.mark.parametrize("verb", ["stats", "router", "shutdown", "log-status"])
def test_the_emperor_wide_verbs_are_roots(verb):
    emperor = StubEmperor()
    assert str(refused(emperor, verb, {}, ALICE)) == "not permitted"
    assert not emperor.down and not emperor.logged


def test_shutdown_and_log_status_as_root():
    emperor = StubEmperor()
    assert run(emperor, "shutdown", {}) == {"shutting_down": True} and emperor.down
    assert run(emperor, "log-status", {}) == {"logged": 3} and len(emperor.logged) == 4


def test_help_for_an_unknown_verb_is_a_usage_error():
    error = refused(StubEmperor(), "help", {"names": ["logs", "nosuch"]}, ALICE)
    assert error.code == USAGE and "nosuch" in str(error)


def test_status_of_an_unknown_name_is_refused_for_root_too():
    emperor = StubEmperor()
    assert [v["name"] for v in run(emperor, "status", {"names": ["a.ini"]})["vassals"]] == ["a.ini"]
    assert refused(emperor, "status", {"names": ["nope.ini"]}).code == REFUSED


@pytest.mark.parametrize(("verb", "asked"), [("reload", "reload"), ("restart", "restart"), ("reset", "reset")])
def test_all_asks_every_vassal_root_may_see(verb, asked):
    emperor = StubEmperor()
    if verb == "restart":  # (an invalid config refuses the whole request, as with names)
        assert "a2.ini: config invalid" in str(refused(emperor, verb, {"all": True}))
        assert all(not v.asked for v in emperor.vassals.values())
        del emperor.vassals["a2.ini"]
    run(emperor, verb, {"all": True})
    assert {name: v.asked for name, v in emperor.vassals.items() if v.config is not None} == \
        {"a.ini": [asked], "b.ini": [asked]}


def test_router_as_root(monkeypatch):
    from emperor import reporting

    monkeypatch.setattr(reporting, "router_stats", lambda emperor: emperor.router_stats())
    assert run(StubEmperor(), "router", {}) == {"running": False}
