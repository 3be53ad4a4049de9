"""One-machine rehearsal of the team deployment: a PostgreSQL server (Dagster's runs, events and
schedules in database ``dagster``; MLflow's tracking store and registry in database ``mlflow``) and
an MLflow tracking server on it with proxied artifact storage, all under ``$PSQA_HOME/team/``.

``psqa team up`` / ``make team-up`` starts what is not running (``initdb`` on first use), checks
each service's health and writes ``team/state.json``; ``psqa team down`` stops them; ``psqa team
status`` reports. A shared deployment points ``PSQA_PG_URL`` / ``PSQA_MLFLOW_URL`` at real
servers instead and never runs this module.

PostgreSQL refuses to run as root: started by root, the data folder is handed to an unprivileged
user (``postgres`` when it exists, else ``nobody``) and the server runs as that user through
``runuser``. The rehearsal cluster trusts connections from 127.0.0.1 only (``--auth=trust``,
``listen_addresses=127.0.0.1``); a real server uses passwords, kept out of files (libpq reads
``PGPASSWORD`` or ``~/.pgpass``).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from psqa_pipelines.settings import child_env, team_mlflow_url, team_pg_url

PG_USER = "psqa"  # the database role initdb creates (superuser of the rehearsal cluster)
DATABASES = ("dagster", "mlflow")


class TeamServiceError(RuntimeError):
    """A team service cannot start or is unhealthy; the message says which and why."""


def _which(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise TeamServiceError(
            f"`{name}` not found: install PostgreSQL (Debian: apt-get install -y postgresql; its binaries "
            f"are in /usr/lib/postgresql/<version>/bin) and put them on PATH"
        )
    return path


def _service_user() -> str | None:
    """None when not root; else the unprivileged account the server runs as."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise TeamServiceError("running as root and no unprivileged user (postgres, nobody) to run PostgreSQL")


def _as_service_user(cmd: list[str]) -> list[str]:
    user = _service_user()
    return cmd if user is None else [_which("runuser"), "-u", user, "--", *cmd]


def _wait(check, what: str, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
    raise TeamServiceError(f"{what} did not become healthy within {timeout:.0f} s" + (f"\n{tail}" if tail else ""))


@dataclass
class TeamServices:
    """The rehearsal services of one ``PSQA_HOME``; URLs from the settings (``PSQA_PG_URL``,
    ``PSQA_MLFLOW_URL``), whose host must then be this machine."""

    home: Path

    @property
    def root(self) -> Path:
        return self.home / "team"

    @property
    def pg_data(self) -> Path:
        return self.root / "pg"

    @property
    def pg_port(self) -> int:
        return urlsplit(team_pg_url()).port or 5432

    @property
    def mlflow_port(self) -> int:
        return urlsplit(team_mlflow_url()).port or 5000

    def pg_url(self, database: str) -> str:
        return f"{team_pg_url().rstrip('/')}/{database}"

    # -- PostgreSQL ------------------------------------------------------------------------
    def _pg_ready(self) -> bool:
        try:
            import psycopg2

            psycopg2.connect(self.pg_url("postgres"), connect_timeout=2).close()
            return True
        except Exception:  # noqa: BLE001 - any failure means not (yet) ready
            return False

    def postgres_up(self) -> None:
        if self._pg_ready():
            self._create_databases()
            return
        initdb, pg_ctl = _which("initdb"), _which("pg_ctl")
        user = _service_user()
        self.root.mkdir(parents=True, exist_ok=True)
        if not (self.pg_data / "PG_VERSION").exists():
            self.pg_data.mkdir(parents=True, exist_ok=True)
            if user is not None:
                shutil.chown(self.pg_data, user)
                os.chmod(self.pg_data, 0o700)
                _grant_traverse(self.pg_data.parent, user)
            out = subprocess.run(
                _as_service_user([initdb, "-D", str(self.pg_data), "-U", PG_USER, "--auth=trust", "-E", "UTF8"]),
                capture_output=True,
                text=True,
            )
            if out.returncode != 0:
                raise TeamServiceError(f"initdb failed:\n{out.stderr[-2000:]}")
        log = self.pg_data / "server.log"
        opts = f"-p {self.pg_port} -c listen_addresses=127.0.0.1 -k {self.pg_data}"
        out = subprocess.run(
            _as_service_user([pg_ctl, "-D", str(self.pg_data), "-l", str(log), "-o", opts, "-w", "-t", "60", "start"]),
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise TeamServiceError(f"PostgreSQL did not start on port {self.pg_port}:\n{out.stderr[-1000:]}\n{tail}")
        _wait(self._pg_ready, f"PostgreSQL on 127.0.0.1:{self.pg_port}", 60, log)
        self._create_databases()

    def _create_databases(self) -> None:
        import psycopg2

        conn = psycopg2.connect(self.pg_url("postgres"))
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                for db in DATABASES:
                    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
                    if cur.fetchone() is None:
                        cur.execute(f'CREATE DATABASE "{db}"')
        finally:
            conn.close()

    def postgres_down(self) -> None:
        if not (self.pg_data / "postmaster.pid").exists():
            return
        subprocess.run(
            _as_service_user([_which("pg_ctl"), "-D", str(self.pg_data), "-m", "fast", "-w", "stop"]),
            capture_output=True,
            text=True,
        )

    # -- MLflow tracking server ------------------------------------------------------------
    @property
    def _mlflow_pid(self) -> Path:
        return self.root / "mlflow-server.pid"

    def _mlflow_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{team_mlflow_url().rstrip('/')}/health", timeout=2) as r:
                return r.status == 200
        except Exception:  # noqa: BLE001
            return False

    def mlflow_up(self) -> None:
        if self._mlflow_ready():
            return
        artifacts = self.home / "mlflow" / "artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        log = self.root / "mlflow-server.log"
        mlflow_bin = Path(sys.executable).parent / "mlflow"
        cmd = [
            str(mlflow_bin) if mlflow_bin.exists() else "mlflow",
            "server",
            "--backend-store-uri",
            self.pg_url("mlflow").replace("postgresql://", "postgresql+psycopg2://", 1),
            "--artifacts-destination",
            str(artifacts),
            "--serve-artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.mlflow_port),
            "--workers",
            "1",
        ]
        with open(log, "ab") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
        self._mlflow_pid.write_text(str(proc.pid))
        _wait(self._mlflow_ready, f"MLflow server on {team_mlflow_url()}", 120, log)

    def mlflow_down(self) -> None:
        if not self._mlflow_pid.exists():
            return
        pid = int(self._mlflow_pid.read_text())
        try:
            os.killpg(pid, signal.SIGTERM)
            for _ in range(40):
                os.killpg(pid, 0)
                time.sleep(0.25)
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._mlflow_pid.unlink(missing_ok=True)

    # -- all -------------------------------------------------------------------------------
    def up(self) -> dict:
        self.postgres_up()
        self.mlflow_up()
        state = self.status()
        (self.root / "state.json").write_text(json.dumps(state, indent=2))
        return state

    def down(self) -> None:
        self.mlflow_down()
        self.postgres_down()

    def status(self) -> dict:
        return {
            "postgres": {"url": team_pg_url(), "healthy": self._pg_ready(), "data": str(self.pg_data)},
            "mlflow": {"url": team_mlflow_url(), "healthy": self._mlflow_ready()},
        }


def _grant_traverse(folder: Path, user: str) -> None:
    """The service user must reach its data folder: o+x on ``folder`` and its parents (no read)."""
    for p in [folder, *folder.parents]:
        mode = p.stat().st_mode
        if not mode & 0o001:
            try:
                os.chmod(p, mode | 0o001)
            except PermissionError as exc:
                raise TeamServiceError(f"{user} cannot reach {folder}: no search permission on {p}") from exc
