"""`regmix mlflow up` / `down`: an MLflow tracking server on PostgreSQL on this machine, deployed
the way k8s/overlays/dev deploys it (PostgreSQL backend store, artifacts served by the server),
for the containerized rehearsal of a cluster run and for a team sharing one machine.

Everything lives in one folder (default mlruns/server): the database cluster, the artifacts, the
logs and the server's pid. PostgreSQL is Debian's package, run as its `postgres` user when this
runs as root (PostgreSQL refuses root), listening on localhost only with local trust auth.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from regmix.errors import UserError
from regmix.probe import http_status

DEFAULT_FOLDER = Path("mlruns/server")
DATABASE = "mlflow"
START_SECONDS = 120


class ServerError(UserError):
    """The server cannot start here as asked; says what to install or change."""


def postgres_bin() -> Path:
    """The newest installed PostgreSQL's programs (Debian keeps them out of PATH)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                   key=lambda p: int(p.parent.parent.name))
    if found:
        return found[-1].parent
    if pg_ctl := shutil.which("pg_ctl"):
        return Path(pg_ctl).parent
    raise ServerError("PostgreSQL is not installed: apt-get install -y postgresql (Debian), "
                      "or point --tracking-uri at a running MLflow server")


def as_database_owner(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def healthy(uri: str) -> bool:
    try:
        return http_status(f"{uri}/health", timeout=2) == 200
    except OSError:
        return False


def run_quietly(command: list[str], log: Path) -> None:
    with open(log, "a") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise ServerError(f"`{' '.join(command)}` failed; see {log}")


def start_postgres(folder: Path, port: int) -> str:
    """Start (creating on first use) the database cluster under `folder`; its SQLAlchemy URI."""
    bin_dir, data, log = postgres_bin(), folder / "postgres", folder / "postgres.log"
    log.touch()
    if os.geteuid() == 0:  # the postgres user must own its data and log, and reach them
        for path in (folder, log):
            shutil.chown(path, "postgres", "postgres")
        folder.chmod(0o755)
    if not (data / "PG_VERSION").exists():
        run_quietly(as_database_owner([str(bin_dir / "initdb"), "-D", str(data), "-U", DATABASE,
                                       "--auth=trust", "-E", "UTF8"]), log)
    status = subprocess.run(as_database_owner([str(bin_dir / "pg_ctl"), "-D", str(data), "status"]),
                            capture_output=True, check=False)
    if status.returncode != 0:
        options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1"
        run_quietly(as_database_owner([str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options,
                                       "-l", str(log), "-w", "start"]), log)
    exists = subprocess.run(as_database_owner([str(bin_dir / "psql"), "-h", "127.0.0.1", "-p",
                                               str(port), "-U", DATABASE, "-d", DATABASE,
                                               "-c", "select 1"]), capture_output=True, check=False)
    if exists.returncode != 0:
        run_quietly(as_database_owner([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p",
                                       str(port), "-U", DATABASE, DATABASE]), log)
    return f"postgresql+psycopg2://{DATABASE}@127.0.0.1:{port}/{DATABASE}"


def up(folder: Path = DEFAULT_FOLDER, port: int = 5000, postgres_port: int = 5433) -> str:
    """Start PostgreSQL and the MLflow server (if not already up); returns the tracking URI."""
    uri = f"http://127.0.0.1:{port}"
    if healthy(uri):
        return uri
    folder.mkdir(parents=True, exist_ok=True)
    folder = folder.resolve()
    backend = start_postgres(folder, postgres_port)
    (folder / "artifacts").mkdir(exist_ok=True)
    with open(folder / "mlflow.log", "a") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--serve-artifacts",
             "--artifacts-destination", str(folder / "artifacts"), "--host", "0.0.0.0",
             "--port", str(port), "--workers", "2"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # outlives this command
    (folder / "mlflow.pid").write_text(str(server.pid))
    deadline = time.monotonic() + START_SECONDS
    while not healthy(uri):
        if server.poll() is not None or time.monotonic() > deadline:
            raise ServerError(f"the MLflow server did not start on port {port}; see "
                              f"{folder / 'mlflow.log'}")
        time.sleep(1)
    return uri


def down(folder: Path = DEFAULT_FOLDER) -> list[str]:
    """Stop the server and the database under `folder`; what was stopped."""
    stopped = []
    pid_file = folder / "mlflow.pid"
    if pid_file.exists():
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGTERM)  # gunicorn and its workers
            stopped.append("mlflow server")
        except ProcessLookupError:
            pass
        pid_file.unlink()
    data = folder / "postgres"
    if (data / "postmaster.pid").exists():
        run_quietly(as_database_owner([str(postgres_bin() / "pg_ctl"), "-D", str(data.resolve()),
                                       "-m", "fast", "-w", "stop"]), folder / "postgres.log")
        stopped.append("postgresql")
    return stopped
