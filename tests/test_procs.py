"""sglgym.procs with real subprocesses: stopping kills the whole tree (a grandchild that left the process
group included), health waits fail with the server's name, URL and log, free ports are bindable."""

from __future__ import annotations

import os
import socket
import sys
import textwrap
import time

import pytest

from sglgym.procs import (descendants, free_port, pid_alive, start_process, stop_process, stop_tree,
                          wait_healthy)

# A child that starts a grandchild; the grandchild calls setsid (its own session and group, out of reach
# of killpg) and ignores SIGTERM, so only its PID and SIGKILL stop it. Both print their PID and sleep.
GRANDCHILD = textwrap.dedent("""
    import os, signal, time
    os.setsid()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(os.getpid(), flush=True)
    time.sleep(60)
""")
CHILD = textwrap.dedent(f"""
    import subprocess, sys, time
    gc = subprocess.Popen([sys.executable, "-c", {GRANDCHILD!r}], stdout=subprocess.PIPE, text=True)
    print(gc.stdout.readline().strip(), flush=True)
    time.sleep(60)
""")


def _wait_for(pred, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _start_tree(tmp_path):
    server = start_process("tree", [sys.executable, "-c", CHILD], "http://127.0.0.1:9", log_dir=tmp_path)
    assert _wait_for(lambda: server.log_tail().strip()), server.log_tail()
    grandchild = int(server.log_tail().split()[0])
    assert grandchild in descendants(server.pid)
    return server, grandchild


def test_stop_process_kills_the_tree_with_an_escaped_grandchild(tmp_path):
    server, grandchild = _start_tree(tmp_path)
    assert os.getpgid(grandchild) != server.pid     # it left the group: killpg alone would miss it
    t0 = time.monotonic()
    stop_process(server, grace_s=1)
    assert time.monotonic() - t0 < 8
    assert not server.alive() and server.process.returncode is not None   # reaped
    assert _wait_for(lambda: not pid_alive(grandchild)), "the grandchild outlived stop_process"


def test_stop_tree_by_pid(tmp_path):
    server, grandchild = _start_tree(tmp_path)
    stop_tree(server.pid, grace_s=0.5)
    assert _wait_for(lambda: not pid_alive(server.pid) and not pid_alive(grandchild))
    stop_process(server, grace_s=0)   # reaps it and forgets it


def test_wait_healthy_times_out_naming_server_and_url(tmp_path):
    port = free_port()
    server = start_process("silent", [sys.executable, "-c", "import time; time.sleep(60)"],
                           f"http://127.0.0.1:{port}", log_dir=tmp_path)
    with pytest.raises(TimeoutError, match=rf"silent not healthy at http://127\.0\.0\.1:{port}/health"):
        wait_healthy(server, timeout_s=1)
    assert not server.alive()      # stopped before raising


def test_wait_healthy_reports_an_exit_with_the_log_tail(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('boom: no config'); sys.exit(3)"]
    server = start_process("crasher", cmd, f"http://127.0.0.1:{free_port()}", log_dir=tmp_path)
    with pytest.raises(RuntimeError, match=r"(?s)crasher exited with code 3.*boom: no config"):
        wait_healthy(server, timeout_s=10)


def test_free_port_is_bindable():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    assert 0 < port < 65536


def test_a_server_started_from_a_worker_thread_outlives_the_thread():
    """PR_SET_PDEATHSIG is tied to the forking thread: set from a worker thread it would kill the server
    when that thread ends (seen: two engine replicas booted in parallel threads died on their first request)."""
    import threading

    from sglgym.procs import pid_alive, start_process, stop_process

    box = []
    t = threading.Thread(target=lambda: box.append(
        start_process("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], "http://127.0.0.1:1")))
    t.start()
    t.join()
    time.sleep(1.0)   # the kernel signals right when the thread exits
    server = box[0]
    try:
        assert server.alive() and pid_alive(server.pid)
    finally:
        stop_process(server, grace_s=2)
    assert not server.alive()
