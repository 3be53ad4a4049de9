"""The storage resource: every path the pipeline reads or writes, derived from PSQA_HOME."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from psqa_pipelines.settings import default_home, default_openkbp_dir, storage_dir_override


class PsqaStorage(dg.ConfigurableResource):
    """Layout under one root (see ``psqa_pipelines.settings``); empty fields use the default."""

    home: str = Field(default_factory=lambda: str(default_home()), description="PSQA_HOME: root of all pipeline state")
    lake_dir: str = Field(default="", description="override for <home>/lake (PSQA_LAKE_DIR)")
    inbox_dir: str = Field(default="", description="override for <home>/inbox (PSQA_INBOX_DIR)")
    quarantine_dir: str = Field(default="", description="override for <home>/quarantine")
    openkbp_dir: str = Field(
        default_factory=default_openkbp_dir, description="OpenKBP patient folders (read-only source); empty = off"
    )
    openkbp_require_dose: bool = Field(default=True, description="quarantine OpenKBP patients without dose")
    inbox_settle_seconds: float = Field(
        default=5.0, description="ignore files modified more recently than this (still being copied)"
    )

    # -- paths --------------------------------------------------------------------------
    @property
    def home_path(self) -> Path:
        return Path(self.home).expanduser()

    def _sub(self, override: str, name: str) -> Path:
        if override:
            return Path(override).expanduser()
        return storage_dir_override(name) or self.home_path / name

    @property
    def lake(self) -> Path:
        return self._sub(self.lake_dir, "lake")

    @property
    def inbox(self) -> Path:
        return self._sub(self.inbox_dir, "inbox")

    @property
    def quarantine(self) -> Path:
        return self._sub(self.quarantine_dir, "quarantine")

    @property
    def tables(self) -> Path:
        return self.lake / "tables"

    @property
    def quarantine_log(self) -> Path:
        return self.lake / "quarantine_log"

    @property
    def state(self) -> Path:
        """Small PHI-free bookkeeping (ingestion receipts)."""
        return self.lake / "state"

    @property
    def openkbp(self) -> Path | None:
        return Path(self.openkbp_dir).expanduser() if self.openkbp_dir else None

    @property
    def dagster_home(self) -> Path:
        return self.home_path / "dagster"

    @property
    def mlflow_dir(self) -> Path:
        return self.home_path / "mlflow"

    def ensure_dirs(self) -> None:
        for p in (self.lake, self.inbox, self.quarantine, self.tables, self.state):
            p.mkdir(parents=True, exist_ok=True)

    def sources(self) -> list[tuple[str, Path, bool]]:
        """(name, root, writable) of every landing folder the sensor watches."""
        out = [("inbox", self.inbox, True)]
        if self.openkbp is not None and self.openkbp.is_dir():
            out.append(("openkbp", self.openkbp, False))
        return out
