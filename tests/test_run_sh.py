"""run.sh start|stop|restart|status|logs, driven as a user would, from another directory."""

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import APIKEY, ROOT, make_config, write_config
from test_processes import wait_listening

pytestmark = pytest.mark.skipif(not shutil.which("bash"), reason="run.sh needs bash")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def env(tmp_path, upstream):
    config = dict(make_config(upstream), PORT=free_port())
    path = write_config(tmp_path / "config.json", config)
    env = dict(os.environ, CONFIG=path, PIDFILE=str(tmp_path / "ccproxy.pid"),
               LOGFILE=str(tmp_path / "ccproxy.log"), STOP_WAIT_S="10")
    env["port"] = str(config["PORT"])
    yield env
    subprocess.run(["bash", os.path.join(ROOT, "run.sh"), "stop"], env=env, cwd=str(tmp_path),
                   capture_output=True, timeout=30)


def run(env, *args, cwd="/"):
    return subprocess.run(["bash", os.path.join(ROOT, "run.sh")] + list(args), env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=60)


def request(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("POST", "/v1/messages", b'{"model": "m"}', {"x-api-key": APIKEY})
    status = conn.getresponse().status
    conn.close()
    return status


def test_start_status_stop(env):
    result = run(env, "start")
    assert result.returncode == 0, result.stderr
    assert "http://127.0.0.1:%s/" % env["port"] in result.stdout
    assert request(int(env["port"])) == 200
    assert "already running" in run(env, "start").stdout
    status = run(env, "status")
    assert status.returncode == 0 and "is running" in status.stdout
    assert run(env, "restart").returncode == 0
    assert run(env, "stop").returncode == 0
    assert not os.path.exists(env["PIDFILE"])
    status = run(env, "status")
    assert status.returncode == 3 and "not running" in status.stdout
    with open(env["LOGFILE"], encoding="utf-8") as f:
        log = f.read()
    assert "listening on" in log and "stopped" in log and "Traceback" not in log


def test_stale_pid_file_is_handled(env):
    with open(env["PIDFILE"], "w") as f:
        f.write("999999\n")
    assert "not running" in run(env, "status").stdout
    assert not os.path.exists(env["PIDFILE"])
    assert run(env, "start").returncode == 0


def test_failed_start_shows_the_log_tail(env, tmp_path):
    with open(env["CONFIG"], "w") as f:
        f.write('{"PORT": "x"}')
    result = run(env, "start")
    assert result.returncode != 0
    assert "PORT must be a whole number" in result.stderr
    assert not os.path.exists(env["PIDFILE"])


def test_truncated_log_stays_clean(env):
    assert run(env, "start").returncode == 0
    request(int(env["port"]))
    subprocess.run(["truncate", "-s", "0", env["LOGFILE"]], check=True)
    request(int(env["port"]))
    run(env, "stop")
    with open(env["LOGFILE"], "rb") as f:
        data = f.read()
    assert data and not data.startswith(b"\0")          # appended, not written at the old offset


def test_flags_in_ccproxy_args_are_followed(env):
    """CCPROXY_ARGS="--port N": start waits for that port (ccproxy says where it listens), and
    status shows it."""
    port = free_port()
    env = dict(env, CCPROXY_ARGS="--port %d --log-level WARNING" % port)
    result = run(env, "start")
    assert result.returncode == 0, result.stderr
    assert "http://127.0.0.1:%d/" % port in result.stdout and env["port"] not in result.stdout
    assert request(port) == 200
    assert "http://127.0.0.1:%d/" % port in run(env, "status").stdout
    assert run(env, "stop").returncode == 0
    assert "not running" in run(env, "status").stdout


def test_first_start_shows_the_next_step_and_keeps_its_files_private(env, tmp_path):
    os.unlink(env["CONFIG"])
    env = dict(env, CCPROXY_ARGS="--port %d" % free_port())
    result = run(env, "start")
    assert result.returncode == 0, result.stderr
    with open(env["CONFIG"], encoding="utf-8") as f:
        key = json.load(f)["APIKEY"]
    out = result.stdout
    assert "next: add your relay" in out and "下一步" in out and '"ANTHROPIC_BASE_URL"' in out
    assert "see the APIKEY line of" in out
    with open(env["LOGFILE"], encoding="utf-8") as f:
        assert key not in out + f.read()                 # never in a log
    for path in (env["CONFIG"], env["LOGFILE"], env["PIDFILE"]):
        assert os.stat(path).st_mode & 0o777 == 0o600, path


def cmdline(pid):
    with open("/proc/%d/cmdline" % pid, "rb") as f:
        return f.read().split(b"\0")


def test_relative_paths_from_a_directory_with_its_own_ccproxy_py(env, tmp_path):
    """start runs ccproxy as a module from run.sh's directory (from its cached bytecode): a
    ccproxy.py in the caller's directory is not the one run, and CONFIG, LOGFILE and PIDFILE
    given relative to the caller's directory are still found there."""
    work = tmp_path / "工作目录"
    work.mkdir()
    (work / "ccproxy.py").write_text("raise SystemExit('the wrong ccproxy.py')\n")
    os.rename(env["CONFIG"], str(work / "config.json"))
    env = dict(env, CONFIG="config.json", LOGFILE="日志.log", PIDFILE="ccproxy.pid")
    started = run(env, "start", cwd=str(work))
    assert started.returncode == 0, started.stderr
    assert request(int(env["port"])) == 200
    with open(str(work / "ccproxy.pid")) as f:
        pid = int(f.readline())
    assert cmdline(pid)[1:5] == [b"-m", b"ccproxy", b"--config", str(work / "config.json").encode()]
    assert "listening on" in (work / "日志.log").read_text(encoding="utf-8")
    assert "ccproxy stopped" in run(env, "stop", cwd=str(work)).stdout
    assert not os.path.exists(str(work / "ccproxy.pid"))


def test_a_process_started_by_an_older_run_sh_is_still_known(env):
    """run.sh before 2026-12 ran "python3 …/ccproxy.py": after an upgrade, status and stop
    still know that process."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "ccproxy.py"), "--config", env["CONFIG"]],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    try:
        with open(env["PIDFILE"], "w") as f:
            f.write("%d\nhttp://127.0.0.1:%s\n" % (proc.pid, env["port"]))
        wait_listening(int(env["port"]), proc, 15)
        assert "is running (pid %d)" % proc.pid in run(env, "status").stdout
        assert "ccproxy stopped" in run(env, "stop").stdout
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
