"""thunder-lock for real (issue 14 part 3): four workers under a real
emperor, one of them at a time waiting for connections; no thundering-herd
wakeups with it, some without; a holder SIGKILLed does not block the
others; the ipcsem engine's semaphores seen with ipcs, removed at a
graceful stop, kept with persistent-ipcsem, reused with ftok; a semaphore
removed under the workers makes them respawn on a new one."""

from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import psutil
import pytest

from tests.helpers import answers, free_port, hello_ini, wait_for


def ini(port: int, extra: str = "") -> str:
    return hello_ini(port, extra="disable-logging = true\n" + extra, processes=4)


def serve(emp, name: str, port: int, extra: str) -> None:
    """A four-worker vassal ``name`` on ``port``, answering."""
    (emp.dir / name).write_text(ini(port, extra))
    wait_for(lambda: answers(port), what=f"{name} up")


def reported_lock(emp, name: str) -> dict:
    """The thunder_lock of ``name``'s status, once its master has reported."""
    return wait_for(lambda: (v := emp.vassal(name)) and v["thunder_lock"] and v["thunder_lock"], 10, what=f"{name}'s lock in status")


def hammer(port: int, total: int, threads: int = 8) -> list[int]:
    """``total`` requests, each on a new connection, from ``threads`` clients at once."""
    codes: list[int] = []
    lock = threading.Lock()

    def client(count: int) -> None:
        for _ in range(count):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request("GET", "/", headers={"Connection": "close"})
                status = conn.getresponse().status
            except OSError:
                status = 0
            finally:
                conn.close()
            with lock:
                codes.append(status)

    shares = [total // threads + (1 if n < total % threads else 0) for n in range(threads)]
    workers = [threading.Thread(target=client, args=(share,)) for share in shares]
    for t in workers:
        t.start()
    for t in workers:
        t.join(60)
    return codes


def worker_pids(emp, name: str) -> list[int]:
    v = wait_for(lambda: (x := emp.vassal(name)) and x["worker_detail"] and len(x["worker_detail"]) == 4 and x, 15,
                 what="four workers reported")
    return [w["pid"] for w in v["worker_detail"]]


def races(emp, name: str, requests: int) -> int:
    """accept() calls that found nothing, summed over the workers, once the
    status report counts every request."""
    v = wait_for(lambda: (x := emp.vassal(name)) and sum(w["requests"] for w in x["worker_detail"]) >= requests and x, 15,
                 what="the report of every request")
    return sum(w["accept_races"] for w in v["worker_detail"])


def lock_holders(pids: list[int]) -> tuple[set[int], set[int]]:
    """(holding, waiting) among ``pids``, from /proc/locks."""
    holding, waiting = set(), set()
    for line in Path("/proc/locks").read_text().splitlines():
        match = re.match(r"\d+:\s+(->\s+)?POSIX\s+\S+\s+WRITE\s+(\d+)\s", line)
        if match and int(match.group(2)) in pids:
            (waiting if match.group(1) else holding).add(int(match.group(2)))
    return holding, waiting


def semaphores() -> dict[int, int]:
    """semid -> key of every SysV semaphore set (ipcs -s)."""
    out = subprocess.run(["ipcs", "-s"], capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 5 and words[0].startswith("0x") and words[1].isdigit():
            found[int(words[1])] = int(words[0], 16)
    return found


@pytest.fixture
def sem_cleanup():
    made: list[int] = []
    yield made
    for semid in made:
        subprocess.run(["ipcrm", "-s", str(semid)], capture_output=True)


def test_one_worker_at_a_time_waits_for_a_connection(start_emperor):
    emp = start_emperor()
    port = free_port()
    serve(emp, "tl.ini", port, "thunder-lock = true\n")
    pids = worker_pids(emp, "tl.ini")
    holding, waiting = wait_for(lambda: (hw := lock_holders(pids)) and len(hw[0]) == 1 and len(hw[1]) == 3 and hw, 10,
                                what="one holder, three waiting")
    assert holding | waiting == set(pids)
    assert "thunder lock: enabled (engine fcntl)" in emp.log_text()
    v = emp.vassal("tl.ini")
    assert v["thunder_lock"] == {"enabled": True, "engine": "fcntl"}


def test_no_thundering_herd_with_the_lock_and_some_without(start_emperor):
    emp = start_emperor()
    with_port, without_port = free_port(), free_port()
    (emp.dir / "with.ini").write_text(ini(with_port, "thunder-lock = true\n"))
    (emp.dir / "without.ini").write_text(ini(without_port))
    for port in (with_port, without_port):
        wait_for(lambda p=port: answers(p), what="up")
    worker_pids(emp, "with.ini")
    worker_pids(emp, "without.ini")
    before_with, before_without = races(emp, "with.ini", 0), races(emp, "without.ini", 0)
    assert hammer(with_port, 500) == [200] * 500
    assert hammer(without_port, 500) == [200] * 500
    assert races(emp, "with.ini", 500) - before_with == 0
    assert races(emp, "without.ini", 500) - before_without > 0
    assert "thunder lock: disabled (you can enable it with --thunder-lock)" in emp.log_text()
    assert emp.vassal("without.ini")["thunder_lock"] == {"enabled": False, "engine": ""}


def test_a_holder_killed_does_not_block_the_others(start_emperor):
    emp = start_emperor()
    port = free_port()
    serve(emp, "k.ini", port, "thunder-lock = true\n")
    pids = worker_pids(emp, "k.ini")
    holding, _ = wait_for(lambda: (hw := lock_holders(pids)) and len(hw[0]) == 1 and hw, 10, what="a holder")
    victim = holding.pop()
    os.kill(victim, signal.SIGKILL)
    # At once, before the master has replaced it: the lock went with it.
    assert hammer(port, 40, threads=4) == [200] * 40
    wait_for(lambda: not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE, 5,
             what="the victim gone")


def test_ipcsem_is_seen_while_running_and_removed_at_a_graceful_stop(start_emperor, sem_cleanup):
    emp = start_emperor()
    port = free_port()
    serve(emp, "s.ini", port, "thunder-lock = true\nlock-engine = ipcsem\n")
    lock = reported_lock(emp, "s.ini")
    sem_cleanup.append(lock["id"])
    assert lock["engine"] == "ipcsem" and lock["persistent"] is False and semaphores()[lock["id"]] == 0
    assert hammer(port, 100) == [200] * 100
    (emp.dir / "s.ini").unlink()
    wait_for(lambda: emp.vassal("s.ini") is None, 15, what="stopped")
    assert lock["id"] not in semaphores()


def test_persistent_ipcsem_survives_and_ftok_reuses_it(start_emperor, sem_cleanup, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("")
    emp = start_emperor()
    port = free_port()
    extra = f"thunder-lock = true\nlock-engine = ipcsem\npersistent-ipcsem = true\nftok = {key_file}\n"
    serve(emp, "p.ini", port, extra)
    first = reported_lock(emp, "p.ini")
    sem_cleanup.append(first["id"])
    assert first["persistent"] is True and first["key"] != 0 and semaphores()[first["id"]] == first["key"]
    (emp.dir / "p.ini").unlink()
    wait_for(lambda: emp.vassal("p.ini") is None, 15, what="stopped")
    assert semaphores().get(first["id"]) == first["key"]  # kept
    serve(emp, "p.ini", port, extra)
    again = wait_for(lambda: (v := emp.vassal("p.ini")) and v["pid"] and v["thunder_lock"] and v["thunder_lock"], 10,
                     what="lock in status")
    assert (again["id"], again["key"]) == (first["id"], first["key"])
    assert hammer(port, 100) == [200] * 100


def test_a_semaphore_removed_under_the_workers_makes_them_respawn_on_a_new_one(start_emperor, sem_cleanup):
    emp = start_emperor()
    port = free_port()
    serve(emp, "r.ini", port, "thunder-lock = true\nlock-engine = ipcsem\n")
    old = reported_lock(emp, "r.ini")
    old_pids = set(worker_pids(emp, "r.ini"))
    subprocess.run(["ipcrm", "-s", str(old["id"])], check=True)
    new = wait_for(lambda: (v := emp.vassal("r.ini")) and v["thunder_lock"] and v["thunder_lock"]["id"] != old["id"]
                   and v["thunder_lock"], 20, what="a new semaphore")
    sem_cleanup.append(new["id"])
    wait_for(lambda: answers(port), what="answering")
    assert hammer(port, 100) == [200] * 100
    assert f"semaphore {old['id']} is gone" in emp.log_text()
    assert old_pids - set(worker_pids(emp, "r.ini"))  # (at least the waiters were replaced)


def test_lock_engine_is_validated(tmp_path):
    import sys

    bad = tmp_path / "bad.ini"
    bad.write_text("[uwsgi]\nhttp-socket = 127.0.0.1:1\nlock-engine = pthread\n")
    result = subprocess.run([sys.executable, "-m", "vassal", "--check", str(bad)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"{bad}:3" in result.stderr and "lock-engine" in result.stderr and "fcntl, ipcsem" in result.stderr


@pytest.mark.linux_only
def test_ipcsem_lives_in_the_vassals_ipc_namespace(start_emperor):
    emp = start_emperor()
    port = free_port()
    serve(emp, "ns.ini", port, "unshare = ipc\nthunder-lock = true\nlock-engine = ipcsem\n")
    lock = reported_lock(emp, "ns.ini")
    pid = worker_pids(emp, "ns.ini")[0]
    inside = subprocess.run(["nsenter", "--target", str(pid), "--ipc", "ipcs", "-s"], capture_output=True, text=True, check=True)
    assert re.search(rf"^0x0+\s+{lock['id']}\s", inside.stdout, re.M)
    assert os.readlink(f"/proc/{pid}/ns/ipc") != os.readlink("/proc/self/ns/ipc")  # (not the host's)
    assert hammer(port, 40, threads=4) == [200] * 40


def test_a_second_vassal_on_the_same_ftok_file_is_refused(start_emperor, sem_cleanup, tmp_path):
    key_file = tmp_path / "shared"
    key_file.write_text("")
    emp = start_emperor()
    a_port, b_port = free_port(), free_port()
    extra = f"thunder-lock = true\nlock-engine = ipcsem\nftok = {key_file}\n"
    serve(emp, "a.ini", a_port, extra)
    lock = reported_lock(emp, "a.ini")
    sem_cleanup.append(lock["id"])
    (emp.dir / "b.ini").write_text(ini(b_port, extra))
    wait_for(lambda: "used by a vassal with other sockets" in emp.log_text(), 15, what="b refused")
    assert hammer(a_port, 40, threads=4) == [200] * 40  # a is not disturbed
    (emp.dir / "b.ini").unlink()


def test_someone_elses_semaphore_on_the_key_is_refused(start_emperor, tmp_path):
    from jails import locks

    key_file = tmp_path / "victim"
    key_file.write_text("")
    key = locks._libc.ftok(os.fsencode(str(key_file)), ord("T"))
    semid = locks._libc.semget(key, 3, locks.IPC_CREAT | locks.IPC_EXCL | 0o666)  # a squatter's, value 0
    assert semid >= 0
    try:
        emp = start_emperor()
        port = free_port()
        (emp.dir / "v.ini").write_text(ini(port, f"thunder-lock = true\nlock-engine = ipcsem\nftok = {key_file}\n"))
        wait_for(lambda: "is not ours" in emp.log_text(), 15, what="the squatter's semaphore refused")
        assert semid in semaphores()  # and not removed either
    finally:
        locks._libc.semctl(semid, 0, locks.IPC_RMID)


def test_reloads_keep_a_shared_ftok_semaphore(start_emperor, sem_cleanup, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("")
    emp = start_emperor()
    port = free_port()
    serve(emp, "rl.ini", port, f"thunder-lock = true\nlock-engine = ipcsem\nftok = {key_file}\n")
    lock = reported_lock(emp, "rl.ini")
    sem_cleanup.append(lock["id"])
    for _ in range(5):
        emp.ctl("reload", "rl.ini")
        wait_for(lambda: emp.vassal("rl.ini")["state"] == "ready", 15, what="reloaded")
        assert hammer(port, 20, threads=4) == [200] * 20
    assert lock["id"] in semaphores() and "is gone" not in emp.log_text()
    (emp.dir / "rl.ini").unlink()
    wait_for(lambda: emp.vassal("rl.ini") is None, 15, what="stopped")
    wait_for(lambda: lock["id"] not in semaphores(), 5, what="removed by the last master out")


def test_persistent_ipcsem_needs_ftok(start_emperor):
    emp = start_emperor()
    (emp.dir / "np.ini").write_text(ini(free_port(), "thunder-lock = true\nlock-engine = ipcsem\npersistent-ipcsem = true\n"))
    v = emp.wait_state("np.ini", "invalid")
    assert "np.ini:" in v["error"] and "persistent-ipcsem needs ftok" in v["error"]
