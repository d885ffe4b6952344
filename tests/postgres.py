"""A real PostgreSQL for the shared-store tests: a cluster of its own in a temp directory,
made with initdb and started with pg_ctl on a free port (Debian's postgresql package). Each
test gets a database of its own. Without PostgreSQL or psycopg the tests are skipped, unless
CCPROXY_REQUIRE_POSTGRES=1 (CI) makes that a failure. Standard library only, but for psycopg:
tests/bench.py --store uses it too."""

import glob
import os
import shutil
import socket
import subprocess
import tempfile

REQUIRED = os.environ.get("CCPROXY_REQUIRE_POSTGRES") == "1"


def missing(why):
    """Skip the test (fail it under CCPROXY_REQUIRE_POSTGRES=1); outside pytest, stop with why."""
    try:
        import pytest
    except ImportError:
        raise SystemExit("no PostgreSQL for --store: %s" % why)
    if REQUIRED:
        pytest.fail("CCPROXY_REQUIRE_POSTGRES=1 and %s" % why)
    pytest.skip(why)


def server_binaries():
    """The directory of initdb and pg_ctl: on PATH, else Debian's /usr/lib/postgresql/N/bin."""
    found = shutil.which("pg_ctl")
    if found:
        return os.path.dirname(os.path.realpath(found))
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return os.path.dirname(versions[-1]) if versions else None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """One PostgreSQL server, its own: start(), stop() (as an outage would), databases."""

    def __init__(self):
        self.bin = server_binaries()
        self.dir = tempfile.mkdtemp(prefix="ccproxy-pg-")
        self.port = free_port()
        self.as_user = []
        if os.geteuid() == 0:           # the server refuses to run as root: as postgres, then
            os.chmod(self.dir, 0o755)
            shutil.chown(self.dir, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.data = os.path.join(self.dir, "data")
        self.run("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-locale")
        self.databases = 0

    def run(self, tool, *args):
        subprocess.run(self.as_user + [os.path.join(self.bin, tool)] + list(args), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)

    def start(self):
        self.run("pg_ctl", "-D", self.data, "-l", os.path.join(self.dir, "log"), "-w", "-o",
                 "-p %d -k %s -c listen_addresses=127.0.0.1 -c fsync=off" % (self.port, self.dir), "start")

    def stop(self):
        self.run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    def url(self, database="postgres"):
        return "postgresql://postgres@127.0.0.1:%d/%s" % (self.port, database)

    def new_database(self):
        import psycopg
        self.databases += 1
        name = "t%d" % self.databases
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE %s" % name)
        return self.url(name)

    def close(self):
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass            # stopped already
        shutil.rmtree(self.dir, ignore_errors=True)


def cluster():
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing("psycopg is not installed (python3 -m pip install -r requirements-dev.txt)")
    if server_binaries() is None:
        missing("PostgreSQL is not installed (apt-get install postgresql)")
    made = Cluster()
    made.start()
    return made
