"""The launcher: everything between a vassal's file and a running
instance. It reads the file once (DESIGN 3: in the vassals' clean
environment, with templates, ``vassal-set`` and the tyrant overrides, every
rule validated), plans the jail (tyrant contract), makes the cgroups and
limits, builds the spawn request and hands it to the zygote or forks it,
and runs the as-emperor hooks after each spawn. A Vassal (lifecycle.py)
gets this object, not the whole Emperor: it is all a vassal may ask for.
"""

from __future__ import annotations

import fnmatch
import os
import signal
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING

import jails
from bedrock.config import (
    Config,
    ConfigError,
    Problem,
    build,
    overrides_entries,
    read_with_templates,
)
from bedrock.identity import acting_as
from bedrock.loop import Loop
from emperor.router_supervisor import RouterSupervisor, address_problems
from emperor.spawn import Spawned, SpawnRequest, spawn
from emperor.zygote_client import ZygoteClient
from jails.tracking import CgroupTree, LimitError, Limits, VassalCgroup, limit_groups
from vassal import hooks, phases

if TYPE_CHECKING:
    from emperor.lifecycle import Vassal

# What every vassal's environment holds besides its own ``env`` keys, the
# emperor protocol's variables and the operator's ``vassal-env-pass``: a
# secret in the emperor's environment must not reach a tenant's app.
BASE_ENV = ("PATH", "LANG", "LANGUAGE", "LC_*", "TZ")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def vassal_environment(environ: dict[str, str], passed: list[str]) -> dict[str, str]:
    """The one environment a vassal's config is expanded in ($(VAR)) and that
    its processes start with."""
    patterns = (*BASE_ENV, *passed)
    env = {k: v for k, v in environ.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}
    env.setdefault("PATH", DEFAULT_PATH)
    return env


# as-emperor hooks run in the emperor's own process at every spawn (a tenant
# decides how often): only actions that neither wait nor change the emperor.
AS_EMPEROR_ACTIONS = ("exec", "print", "write", "mkdir", "unlink")


def emperor_hook_problems(settings: Config) -> list[Problem]:
    return [Problem(h.entry.file, h.entry.line, h.entry.key,
                    f"action {h.action} cannot run as-emperor (it would block or change the emperor at every spawn); "
                    f"allowed: {', '.join(AS_EMPEROR_ACTIONS)}")
            for h in hooks.hooks_for(settings, "as-emperor") if h.action not in AS_EMPEROR_ACTIONS]


class Launcher:
    def __init__(self, settings: Config, loop: Loop, log: Callable[[str], None],
                 vassal_log: Callable[[Vassal, str], None], forget: Callable[[Vassal], None]):
        self.settings = settings
        self.loop = loop
        self.log = log
        self.vassal_log = vassal_log
        self.forget = forget  # the emperor drops a vassal whose file is gone, once it has exited
        self.throttle_ms = settings.get_int("emperor-throttle")
        self.max_throttle_ms = settings.get_int("emperor-max-throttle")
        self.required_heartbeat = settings.get_int("emperor-required-heartbeat")
        self.curse_tolerance = settings.get_int("emperor-curse-tolerance")
        self.log_lines = settings.get_int("emperor-log-lines")
        self.wrapper = settings.get_opt_str("emperor-wrapper")
        self.inherit: list[str] = [os.path.abspath(p) for p in settings.getlist("vassals-inherit")]
        self.vassal_set: list[tuple[str, str]] = list(settings.getlist("vassal-set"))
        self.vassal_env = vassal_environment(dict(os.environ), list(settings.getlist("vassal-env-pass")))
        self.tyrant = settings.get_bool("emperor-tyrant")
        self.clone = ["fs" if n == "mount" else n for n in settings.get_words("emperor-use-clone")]
        self.as_vassal = [(h.action, h.args, h.entry.key, h.entry.value) for h in hooks.hooks_for(settings, "as-vassal")]
        # Set by the emperor as it starts:
        self.cgroups: CgroupTree | None = None
        self.zygote: ZygoteClient | None = None
        self.routers: list[RouterSupervisor] = []
        # Spawns the zygote has not answered yet: request id -> vassal.
        self.pending_spawns: dict[int, Vassal] = {}
        self.by_pid: dict[int, Vassal] = {}
        self.hook_pids: dict[int, str] = {}

    def wraps(self, path: str) -> bool:
        """A real uWSGI (emperor-wrapper) runs this file, not our vassal."""
        return bool(self.wrapper) and path.endswith(".ini")

    def overrides_for(self, config: Config) -> list[tuple[str, str]]:
        """``vassal-set`` values, then in tyrant mode without namespaces the
        file owner's uid/gid (last, so the file cannot override them)."""
        overrides = list(self.vassal_set)
        if config.owner is not None and not phases.tyrant_namespaces(config, set(self.clone)):
            overrides += [("uid", str(config.owner[0])), ("gid", str(config.owner[1]))]
        return overrides

    def jail_plan(self, config: Config) -> tuple[list[str], tuple[str, str] | None, tuple[int, int] | None]:
        """(namespaces the spawning child makes, their uid/gid maps, the ids
        the vassal becomes before it runs): DESIGN 3's tyrant contract. A
        tenant's vassal in any namespace gets a user namespace mapped to the
        owner owning them all; without namespaces it simply is the owner."""
        if config.owner is None:
            id_maps = jails.backend().id_maps(config) if "user" in self.clone else None
            return list(self.clone), id_maps, None
        namespaces = phases.tyrant_namespaces(config, set(self.clone))
        if not namespaces:
            return [], None, config.owner
        return sorted(namespaces), jails.backend().id_maps(config, config.owner), None

    def tyrant_owner(self, path: str) -> tuple[int, int] | None:
        """The (uid, gid) a file's vassal runs as in tyrant mode. A symlink
        counts only if its own owner is root (the operator's) or the target's
        owner: otherwise one tenant would run, and name, another's config."""
        if not self.tyrant:
            return None
        link = os.lstat(path)
        if stat.S_ISLNK(link.st_mode):
            # Followed as the link's owner: whether a file exists in another
            # tenant's private dir, and whose it is, is not the link owner's to learn.
            with acting_as((link.st_uid, link.st_gid)):
                target = os.stat(path)
        else:
            target = link
        if target.st_nlink > 1:
            # Whoever made a hard link chose the name, not the owner we would see.
            raise ConfigError([Problem(path, None, None, f"tyrant mode: the file has {target.st_nlink} hard links: refusing it")])
        if target is link:
            return link.st_uid, link.st_gid
        if link.st_uid not in (0, target.st_uid):
            raise ConfigError([Problem(path, None, None, f"tyrant mode: a symlink of uid {link.st_uid} to a file of uid {target.st_uid}: refusing it")])
        if self.settings.get_bool("emperor-tyrant-nofollow"):
            return link.st_uid, link.st_gid
        return target.st_uid, target.st_gid

    def read_config(self, path: str) -> Config:
        """The one parse of a vassal's file (DESIGN 3): in the vassals' clean
        environment, templates checked for ownership in tyrant mode, every
        rule validated; the vassal is handed exactly this."""
        lenient = bool(self.wrapper) and path.endswith(".ini")
        owner = None
        if self.tyrant:
            try:
                owner = self.tyrant_owner(path)
            except OSError as exc:
                raise ConfigError([Problem(path, None, None, f"tyrant mode: cannot stat: {exc.strerror}")]) from None
            if owner is not None and (owner[0] == 0 or owner[1] == 0):
                raise ConfigError([Problem(path, None, None, f"tyrant mode: refusing a file owned by root (uid {owner[0]}, gid {owner[1]}); chown it to the tenant")])
        env = self.vassal_env
        entries = read_with_templates(path, inherit=self.inherit, env=env, owner=owner)
        config = build(path, entries + overrides_entries(self.vassal_set), env=env, lenient=lenient)
        config.owner = owner
        if owner is not None and (forced := self.overrides_for(config)[len(self.vassal_set):]):
            config = build(path, entries + overrides_entries(self.vassal_set + forced), env=env, lenient=lenient)
            config.owner = owner
        if not lenient and (problems := jails.unsupported(config) + phases.problems(config, set(self.clone), tyrant=owner)
                            + address_problems(self.settings, config, owner[0] if owner else None)):
            raise ConfigError(problems)
        return config

    def launch(self, vassal: Vassal, cgroup: VassalCgroup | None, procs: list[str]) -> Spawned:
        """Spawn ``vassal.config`` (validated, never None here): by the zygote
        (the pid follows in its reply) or, for a wrapped uWSGI, by fork."""
        config = vassal.config
        assert config is not None
        clone, id_maps, drop = self.jail_plan(config)
        wrapped = self.wraps(vassal.path)
        req = SpawnRequest(
            name=vassal.name,
            path=vassal.path,
            kind="toml" if vassal.path.endswith(".toml") else "ini",
            inherit=list(self.inherit),
            overrides=self.overrides_for(config),
            tyrant=config.owner,
            brokered=any(router.serves(vassal) for router in self.routers),
            id_maps=id_maps,
            wrapper=self.wrapper if wrapped else None,
            cgroup_procs=procs,
            cgroup_dir=cgroup.path if cgroup else None,
            clone=clone,
            as_vassal=self.as_vassal,
            env=self.vassal_env,
            # A wrapped program (a real uWSGI) reads its own file: only ours are handed theirs.
            config=None if wrapped else config.to_json(),
            drop=drop,
            # Root of a tenant's user namespace may make tun devices but not open a 0600 /dev/net/tun.
            tun_devices=len(config.getlist("tuntap-device")) if config.owner is not None and "user" in clone else 0,
        )
        if self.zygote is not None and not wrapped:
            request_id, spawned = self.zygote.spawn(req)
            self.pending_spawns[request_id] = vassal
            return spawned
        return spawn(req)

    def cgroup_for(self, vassal: Vassal) -> VassalCgroup | None:
        if self.cgroups is None:
            return None
        cgroup = self.cgroups.vassal(vassal.name)
        if self.cgroups.unified:
            # A previous instance's dir keeps its OOM count (memory.events), a
            # zygote spare's dir taking its place would not: a fresh dir makes
            # the OOM baseline 0 whichever of the two the vassal ends up in.
            cgroup.remove()
        try:
            cgroup.prepare()
        except OSError as exc:
            self.log(f"[{vassal.name}] cannot create cgroup {cgroup.path}: {exc}; tracking by process group")
            return None
        return cgroup

    def cgroup_procs_for(self, vassal: Vassal, cgroup: VassalCgroup | None) -> list[str]:
        """The cgroups a new vassal process joins: tracking, and limits (set now)."""
        procs = [os.path.join(cgroup.path, "cgroup.procs")] if cgroup else []
        config = vassal.config
        limits = Limits(
            memory=config.get_opt_int("memory-limit") if config else None,
            pids=config.get_opt_int("pids-limit") if config else None,
            cpu=config.get_opt_float("cpu-limit") if config else None,
        )
        vassal.limit_groups = None
        if not limits or not jails.backend().limits_in_cgroups:
            return procs  # (FreeBSD: rctl rules, set by the vassal's jail)
        if self.cgroups is None:
            raise LimitError("memory-limit, pids-limit and cpu-limit need a writable cgroup tree (run the emperor as root)")
        groups = limit_groups(self.cgroups, vassal.name, limits)
        groups.apply(limits)
        vassal.limit_groups = groups
        return sorted(set(procs) | set(groups.procs_files()))

    def after_spawn(self, vassal: Vassal) -> None:
        assert vassal.pid is not None
        self.by_pid[vassal.pid] = vassal
        self._run_as_emperor(vassal)

    def hook_exited(self, pid: int, status: int) -> bool:
        """Whether ``pid`` was an as-emperor hook's command (and is done with)."""
        what = self.hook_pids.pop(pid, None)
        if what is None:
            return False
        if status != 0:
            self.log(f"hook failed in phase as-emperor: {what}: exited with {os.waitstatus_to_exitcode(status)}")
        return True

    def _run_as_emperor(self, vassal: Vassal) -> None:
        """hook-as-emperor / exec-as-emperor: for every spawn, in the emperor,
        never waited for (a command's exit is reaped by the SIGCHLD loop)."""
        found = hooks.hooks_for(self.settings, "as-emperor")
        if not found:
            return
        # The ids the vassal was validated for and runs as, never a fresh
        # stat: the tenant may have swapped the file for a symlink to root's
        # (or another tenant's) by now.
        config = vassal.running_config
        owner = config.owner if config is not None else None
        if owner is None and self.tyrant:
            self.log(f"[{vassal.name}] not running the as-emperor hooks: whose vassal it is is not known")
            return
        if owner is not None:
            uid, gid = owner
        else:
            try:
                st = os.lstat(vassal.path)
            except OSError:
                return  # gone already
            uid, gid = st.st_uid, st.st_gid
        env = {
            **os.environ,
            "UWSGI_VASSAL_CONFIG": vassal.path,
            "UWSGI_VASSAL_PID": str(vassal.pid),
            "UWSGI_VASSAL_UID": str(uid),
            "UWSGI_VASSAL_GID": str(gid),
        }
        for hook in found:
            try:
                if hook.action == "exec":
                    pid = os.posix_spawn("/bin/sh", ["/bin/sh", "-c", hook.args], env, setsigdef=(signal.SIGPIPE, signal.SIGCHLD))
                    self.hook_pids[pid] = f"{hook.describe()} for {vassal.name}"
                else:
                    hooks.run_hook(hook)  # only quick actions are allowed here (as_emperor_problems)
            except Exception as exc:
                self.log(f"hook failed in phase as-emperor for {vassal.name}: {hook.describe()}: {exc}")

    def oom_killed(self, vassal: Vassal) -> bool:
        groups = vassal.limit_groups
        return groups is not None and groups.oom_kills() > groups.oom_baseline
