"""What the emperor reports: a vassal's process tree sampled for RSS and
CPU (bounded: the tenant decides how many processes), its status entry,
its fields of uWSGI's emperor stats and the app master's report cleaned of
anything unexpected; the ``status`` and ``stats`` documents and the router's
report. Nothing here changes any state."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import psutil

import jails
from emperor.router_supervisor import idle_stats
from emperor.states import BACKOFF, READY, RELOADING
from jails.tracking import ProcessGroupTracker, VassalCgroup

if TYPE_CHECKING:
    from emperor.commands import Peer
    from emperor.core import Emperor
    from emperor.lifecycle import Vassal

# Status shows at most this many processes of a vassal's tree, each title cut
# to this length (the tenant chooses both), sampled at most this often.
MAX_TREE = 64
MAX_TITLE = 200
USAGE_CACHE = 1.0


class ProcessTree:
    """One vassal's processes, sampled for status; a fresh one per spawn."""

    def __init__(self) -> None:
        self.procs: dict[int, psutil.Process] = {}
        self.detail: list[dict] = []
        self._cpu_sample: tuple[float, float] | None = None
        self._usage: tuple[float, tuple[int, float, int]] | None = None

    def _members(self, tracker: VassalCgroup | ProcessGroupTracker | None, pid: int | None) -> list[psutil.Process]:
        if isinstance(tracker, VassalCgroup) and pid is not None:
            pids = tracker.pids()
        elif pid is not None:
            try:
                top = psutil.Process(pid)
                pids = [pid] + [p.pid for p in top.children(recursive=True)]
            except psutil.Error:
                pids = []
        else:
            pids = []
        procs = []
        for member in pids:
            proc = self.procs.get(member)
            if proc is None:
                try:
                    proc = self.procs[member] = psutil.Process(member)
                except psutil.Error:
                    continue
            procs.append(proc)
        for gone in set(self.procs) - set(pids):
            del self.procs[gone]
        return procs

    def usage(self, tracker: VassalCgroup | ProcessGroupTracker | None, pid: int | None) -> tuple[int, float, int]:
        """(RSS bytes, CPU percent since the last sample, process count) of the
        whole tree. The tenant decides how many processes and how long their
        command lines: the detail is bounded, and sampled at most once a second
        however many clients ask."""
        now = time.monotonic()
        if self._usage is not None and now - self._usage[0] < USAGE_CACHE:
            return self._usage[1]
        rss = 0
        cpu = 0.0
        procs = self._members(tracker, pid)
        self.detail = []
        for proc in procs:
            try:
                own = proc.memory_info().rss
                rss += own
                times = proc.cpu_times()
                cpu += times.user + times.system
                title = " ".join(proc.cmdline()[:16])[:MAX_TITLE].strip("\0 ") if len(self.detail) < MAX_TREE else ""
            except psutil.Error:
                continue
            if len(self.detail) < MAX_TREE:
                self.detail.append({"pid": proc.pid, "rss_bytes": own, "title": title})
        percent = 0.0
        if self._cpu_sample is not None and now > self._cpu_sample[0]:
            percent = max(0.0, (cpu - self._cpu_sample[1]) / (now - self._cpu_sample[0]) * 100.0)
        self._cpu_sample = (now, cpu)
        result = (rss, round(percent, 1), len(procs))
        self._usage = (now, result)
        return result


def status(vassal: Vassal) -> dict:
    """One vassal in ``emperorctl status`` (and the stats document)."""
    rss, cpu, count = vassal.tree.usage(vassal.tracker, vassal.pid)
    detail = vassal.tree.detail
    report = vassal.app_status if vassal.pid is not None else None
    if report is not None:
        # The app master's own report: RSS sampled every second, busy-ness, cheaper's reasons.
        workers = [w for w in report["workers"] if not w["cheapened"]]
        rss_list = [w["rss_bytes"] for w in workers]
        cheaper = report["cheaper"]
        thunder = report.get("thunder_lock")
    else:
        # Single-process vassals (the master serves) and foreign vassals: the process tree.
        workers = [p for p in detail if p["title"].startswith("vassal worker")]
        rss_list = [p["rss_bytes"] for p in workers]
        cheaper = None
        thunder = None
    return {
        "workers": len(workers),
        "worker_rss_bytes": rss_list,
        "worker_detail": workers if report is not None else None,
        "cheaper": cheaper,
        "thunder_lock": thunder,
        "jail": jails.backend().describe(vassal.config, vassal.name) if vassal.config is not None else None,
        "tree": detail,
        "name": vassal.name,
        "config": vassal.path,
        "state": vassal.state,
        "pid": vassal.pid,
        "restarts": vassal.restarts,
        "last_exit": vassal.last_exit,
        "loyal": vassal.loyal,
        "started_at": vassal.started_at,
        "ready_at": vassal.ready_at,
        "backoff_until": vassal.backoff_until,
        "error": vassal.error,
        "rss_bytes": rss,
        "cpu_percent": cpu,
        "processes": count,
        "held": vassal.held,
        "wrapped": vassal.wrapped,
        "unknown_pipe_bytes": vassal.unknown_bytes,
        "last_heartbeat_age": None if vassal.last_heartbeat is None else round(time.monotonic() - vassal.last_heartbeat, 1),
    }

def uwsgi_stats(vassal: Vassal) -> dict:
    """The per-vassal fields of uWSGI's emperor stats, for uwsgitop-style tools."""
    if vassal.owner is not None:
        uid, gid = vassal.owner
    else:
        try:
            st = os.lstat(vassal.path)
            uid, gid = st.st_uid, st.st_gid
        except OSError:
            uid = gid = -1
    heartbeat = int(time.time() - (time.monotonic() - vassal.last_heartbeat)) if vassal.last_heartbeat else 0
    born = int(vassal.started_at or 0)
    return {
        "id": vassal.name,
        "pid": vassal.pid or 0,
        "born": born,
        "last_mod": int((vassal.signature.mtime_ns if vassal.signature else 0) / 1e9),
        "last_heartbeat": heartbeat,
        "loyal": 1 if vassal.loyal else 0,
        "ready": 1 if vassal.state == READY else 0,
        "accepting": 1 if vassal.state in (READY, RELOADING) else 0,
        "last_loyal": 0,
        "last_ready": int(vassal.ready_at or 0),
        "last_accepting": int(vassal.ready_at or 0),
        "first_run": born,
        "last_run": born,
        "cursed": 1 if vassal.last_exit and vassal.last_exit.get("reason") == "curse" else 0,
        "zerg": 0,
        "on_demand": "",
        "uid": uid,
        "gid": gid,
        "monitor": os.path.dirname(vassal.path),
        "respawns": vassal.restarts,
    }


def emperor_section(emperor: Emperor) -> dict:
    """The emperor's own part of status."""
    return {
        "pid": os.getpid(),
        "version": "pyemperor",
        "started_at": emperor.started_at,
        "uptime": round(time.time() - emperor.started_at, 1),
        "dirs": [s.directory + ("/" + s.pattern if s.pattern else "") for s in emperor.sources],
        "monitor": emperor.monitor.mode if emperor.monitor else None,
        "control": emperor.settings.get_str("emperor-control"),
        "tracking": emperor.cgroups.base if emperor.cgroups else "process-group",
        "tyrant": emperor.tyrant,
        "shutting_down": emperor.shutting_down,
        "vassal_count": len(emperor.vassals),
        "dropped_log_lines": emperor.dropped_log_lines,
        "throttle_ms": emperor.launcher.throttle_ms,
        "max_throttle_ms": emperor.launcher.max_throttle_ms,
    }

def status_document(emperor: Emperor, names: list[str] | None = None, peer: Peer | None = None) -> dict:
    """``status``: the emperor and the vassals named (all), as ``peer`` may see them."""
    vassals = [v for n, v in sorted(emperor.vassals.items()) if not names or n in names]
    if peer is not None:
        vassals = [v for v in vassals if peer.may_see(v)]
    return {"emperor": emperor_section(emperor), "vassals": [status(v) for v in vassals]}

def router_stats(emperor: Emperor) -> dict:
    """The router's last report (every router's, if there are several)."""
    if not emperor.launcher.routers:
        return idle_stats()
    doc = emperor.launcher.routers[0].stats()
    if len(emperor.launcher.routers) > 1:
        doc["routers"] = [r.stats() for r in emperor.launcher.routers]
    return doc

def stats_document(emperor: Emperor) -> dict:
    """uWSGI's emperor stats layout (its fields kept) plus our status:
    each vassal has uWSGI's fields and ours (``loyal`` is uWSGI's 0/1)."""
    doc = status_document(emperor)
    section = doc["emperor"]
    for entry in doc["vassals"]:
        entry.update(uwsgi_stats(emperor.vassals[entry["name"]]))
    return {
        "version": "pyemperor",
        "pid": section["pid"],
        "uid": os.getuid(),
        "gid": os.getgid(),
        "cwd": os.getcwd(),
        "emperor": [s.directory for s in emperor.sources],
        "emperor_tyrant": 1 if emperor.tyrant else 0,
        "throttle_level": emperor.launcher.throttle_ms,
        "vassals": doc["vassals"],
        "router": router_stats(emperor),
        "blacklist": [
            {"id": v["name"], "reason": (v["last_exit"] or {}).get("reason", ""), "throttle_level": emperor.vassals[v["name"]].throttle_ms,
             "attempt": v["restarts"], "first_attempt": int(v["started_at"] or 0), "last_attempt": int((v["last_exit"] or {}).get("at", 0))}
            for v in doc["vassals"]
            if v["state"] == BACKOFF
        ],
        "status": section,
    }


def clean_report(doc: object) -> dict | None:
    """An app master's report with only the fields and types we show; None
    if it is not one (the app itself could write anything on that socket)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("workers"), list):
        return None

    def number(value: object) -> int:
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0

    workers = [
        {"index": number(w.get("index")), "pid": number(w.get("pid")), "rss_bytes": number(w.get("rss_bytes")),
         "busy": w.get("busy") is True, "requests": number(w.get("requests")), "cheapened": w.get("cheapened") is True,
         "accept_races": number(w.get("accept_races"))}
        for w in doc["workers"][:1024] if isinstance(w, dict)
    ]
    cheaper = doc.get("cheaper")
    if isinstance(cheaper, dict):
        last = cheaper.get("last")
        cheaper = {
            "minimum": number(cheaper.get("minimum")),
            "maximum": number(cheaper.get("maximum")),
            "workers": number(cheaper.get("workers")),
            "last": {"action": str(last.get("action"))[:16], "count": number(last.get("count")),
                     "reason": str(last.get("reason"))[:200], "at": last.get("at") if isinstance(last.get("at"), float) else None}
            if isinstance(last, dict) else None,
        }
    else:
        cheaper = None
    lock = doc.get("thunder_lock")
    thunder = None
    if isinstance(lock, dict):
        thunder = {"enabled": lock.get("enabled") is True, "engine": str(lock.get("engine", ""))[:16]}
        if isinstance(lock.get("id"), int):
            thunder.update(id=number(lock.get("id")), key=number(lock.get("key")), persistent=lock.get("persistent") is True)
    return {"workers": workers, "cheaper": cheaper, "master_pid": number(doc.get("master_pid")), "thunder_lock": thunder}
