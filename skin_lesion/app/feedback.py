"""What the review page keeps: a log of every prediction, and the diagnoses clinicians confirm.

Both live in one SQLite file (`skin-lesion review --db`). Images are stored beside it, named by their
sha256, only once a diagnosis is recorded for them. `export_feedback` turns the confirmed diagnoses
into a folder the pipeline ingests with `download.source: local`, closing the loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from skin_lesion.errors import PipelineError
from skin_lesion.evaluation.sites import REVIEW_LOG
from skin_lesion.files import atomic_file, atomic_output_dir, write_csv_atomic, write_json_atomic
from skin_lesion.params import COLLECTION_FROM_ID, LocalParams

OTHER_DIAGNOSIS = "other/unknown"  # recorded, but not a class to train on
EXPORT_METADATA = "index.csv"
EXPORT_COLLECTION = "review feedback"
# What an export wrote, listed in its folder: a later export may replace those files and only those.
EXPORT_MARKER = ".export-feedback.json"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id INTEGER PRIMARY KEY, time TEXT NOT NULL, model TEXT NOT NULL, model_version TEXT,
    sha256 TEXT NOT NULL, predicted_label TEXT, p_melanoma REAL, melanoma_alert INTEGER,
    ood_score REAL, unlike_training INTEGER, problems TEXT, probabilities TEXT
);
CREATE TABLE IF NOT EXISTS diagnoses (
    sha256 TEXT PRIMARY KEY, time TEXT NOT NULL, filename TEXT, image TEXT NOT NULL,
    diagnosis TEXT NOT NULL, biopsy TEXT, model_version TEXT, p_melanoma REAL
);
"""


@dataclass(frozen=True)
class Diagnosis:
    """A clinician's confirmed diagnosis of one image."""

    sha256: str
    filename: str
    diagnosis: str
    biopsy: str
    model_version: str
    p_melanoma: float | None


class FeedbackStore:
    """The SQLite file of predictions and diagnoses, and the folder of diagnosed images beside it."""

    def __init__(self, path: Path, create: bool = True) -> None:
        """Open the database at `path`, creating it when `create`; otherwise it must exist, read-only."""
        self.path = Path(path)
        self.images = self.path.parent / "images"
        self.read_only = not create
        if self.read_only:
            _require_database(self.path)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # A connection per call: the web server writes from worker threads.
        try:
            if self.read_only:  # mode=ro: a file that vanished since is an error, not a new database
                db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
            else:
                db = sqlite3.connect(self.path, timeout=30)
        except sqlite3.Error as err:
            raise PipelineError(f"{self.path}: cannot open the feedback database ({err})") from err
        try:
            with db:
                yield db
        except sqlite3.DatabaseError as err:
            raise PipelineError(f"{self.path}: feedback database error ({err})") from err
        finally:
            db.close()

    def log_predictions(self, rows: Sequence[dict[str, Any]]) -> None:
        """Append scored images to the prediction log (no image bytes)."""
        now = _now()
        with self._connect() as db:
            db.executemany(
                "INSERT INTO predictions (time, model, model_version, sha256, predicted_label, p_melanoma,"
                " melanoma_alert, ood_score, unlike_training, problems, probabilities)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        now,
                        row["model"],
                        row["model_version"],
                        row["sha256"],
                        row["predicted_label"],
                        row["p_melanoma"],
                        int(row["melanoma_alert"]),
                        row["ood_score"],
                        int(row["unlike_training"]),
                        json.dumps(row["problems"]),
                        json.dumps(row["probabilities"]),
                    )
                    for row in rows
                ],
            )

    def record_diagnosis(self, diagnosis: Diagnosis, image: bytes, suffix: str) -> None:
        """Store the image (named by its sha256) and its diagnosis; a later record replaces an earlier one."""
        if hashlib.sha256(image).hexdigest() != diagnosis.sha256:
            raise PipelineError(f"image bytes do not match sha256 {diagnosis.sha256}")
        target = self.images / f"{diagnosis.sha256}{suffix}"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(target, suffix=suffix) as tmp:
                tmp.write_bytes(image)
        with self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO diagnoses VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    diagnosis.sha256,
                    _now(),
                    diagnosis.filename,
                    target.name,
                    diagnosis.diagnosis,
                    diagnosis.biopsy,
                    diagnosis.model_version,
                    diagnosis.p_melanoma,
                ),
            )

    def diagnoses(self) -> pd.DataFrame:
        """Every recorded diagnosis, newest first."""
        with self._connect() as db:
            return pd.read_sql_query("SELECT * FROM diagnoses ORDER BY time DESC", db)

    def predictions(self, since: datetime | None = None) -> pd.DataFrame:
        """The prediction log, oldest first, from `since` on."""
        start = (since or datetime.min.replace(tzinfo=UTC)).isoformat()
        with self._connect() as db:
            return pd.read_sql_query(
                "SELECT * FROM predictions WHERE time >= ? ORDER BY id", db, params=(start,)
            )


def export_feedback(
    store: FeedbackStore, out: Path, classes: Sequence[str], local: LocalParams, base: Path | None = None
) -> pd.DataFrame:
    """Write the diagnosed images as <out>/Train/<class>/<sha>.<ext> with a metadata CSV; their rows.

    The CSV is named and laid out as `local` (download.local) expects, so that pointing
    download.local.path at `out` is the only change needed to train on it. With `base` (a dataset
    folder in the same layout, such as the one the model was trained on) its images and metadata
    rows are copied too, so the next run trains on both. Diagnoses outside `classes`
    (other/unknown) are left out: there is no class to train them as. Each reviewed image is its own
    lesion, as the page knows nothing else about it.
    """
    records = store.diagnoses()
    records = records[records["diagnosis"].isin(classes)]
    if records.empty:
        raise PipelineError(f"{store.path}: no diagnoses of the model's classes to export")
    metadata_name = local.metadata or EXPORT_METADATA
    check_export_target(Path(out))
    with atomic_output_dir(out) as tmp:
        base_rows = _copy_base(base, tmp, metadata_name) if base is not None else pd.DataFrame()
        rows = []
        for record in records.itertuples():
            source = store.images / record.image
            if not source.is_file():
                raise PipelineError(f"{source}: the diagnosed image is missing from the feedback store")
            stem = record.sha256[:20]
            target = tmp / "Train" / record.diagnosis / f"{stem}{source.suffix}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            rows.append(_metadata_row(record, stem, local))
        table = pd.DataFrame(rows).sort_values("isic_id", ignore_index=True)
        write_csv_atomic(tmp / metadata_name, pd.concat([base_rows, table], ignore_index=True).fillna(""))
        write_json_atomic(tmp / REVIEW_LOG, review_log_summary(store.predictions(), store.diagnoses()))
        write_json_atomic(tmp / EXPORT_MARKER, {"files": sorted(_entries(tmp))})
    return table


def review_log_summary(predictions: pd.DataFrame, diagnoses: pd.DataFrame) -> dict[str, int]:
    """How many distinct images the page scored and alerted, and how many of each got a diagnosis.

    A site set made of the diagnoses is only as representative as the choice of what to record: the
    site stage compares the alert rate among the diagnosed images with that of all logged ones.
    """
    alerted = set(predictions.loc[predictions["melanoma_alert"] == 1, "sha256"])
    logged = set(predictions["sha256"])
    diagnosed = set(diagnoses["sha256"]) & logged
    return {
        "logged_images": len(logged),
        "logged_alerts": len(alerted),
        "diagnosed_images": len(diagnosed),
        "diagnosed_alerts": len(diagnosed & alerted),
    }


def check_export_target(out: Path) -> None:
    """Refuse an `out` whose replacement would lose files: one holding anything an export did not write."""
    if out.is_symlink():
        raise PipelineError(f"{out}: is a link; name the folder to write itself")
    if not out.exists():
        return
    if not out.is_dir():
        raise PipelineError(f"{out}: is a file, not a folder; name a new or empty folder")
    foreign = sorted(_entries(out) - _exported_entries(out) - {EXPORT_MARKER})
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise PipelineError(
            f"{out}: holds files export-feedback did not write ({foreign[0]}{more}), which writing "
            "the export would delete; name a new or empty folder"
        )


def _entries(folder: Path) -> set[str]:
    # Everything but folders, relative to `folder`; links to folders count as files and are not followed.
    found = set()
    for parent, folders, files in os.walk(folder, onerror=_unlistable):
        links = [name for name in folders if (Path(parent) / name).is_symlink()]
        for name in [*files, *links]:
            found.add((Path(parent) / name).relative_to(folder).as_posix())
    return found


def _unlistable(err: OSError) -> None:
    # os.walk skips a folder it cannot read: its files would be deleted unseen.
    raise PipelineError(f"{err.filename}: cannot be listed ({err.strerror}); name a new or empty folder")


def _exported_entries(out: Path) -> set[str]:
    marker = out / EXPORT_MARKER
    if marker.is_symlink() or not marker.is_file():
        return set()
    try:
        listing = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # not a marker this command wrote: nothing there counts as exported
        return set()
    files = listing.get("files") if isinstance(listing, dict) else None
    return {name for name in files if isinstance(name, str)} if isinstance(files, list) else set()


def _require_database(path: Path) -> None:
    # sqlite3 would create a missing file, and reads an empty one as an empty database: a mistyped
    # --db would report "no predictions" instead of the mistake.
    if not path.exists():
        raise PipelineError(f"{path}: no feedback database there (`skin-lesion review` creates one)")
    if not path.is_file():
        raise PipelineError(f"{path}: not a file, so not a feedback database")
    if path.stat().st_size == 0:
        raise PipelineError(f"{path}: the file is empty (0 bytes), not a feedback database")


def _metadata_row(record: Any, stem: str, local: LocalParams) -> dict[str, str]:
    row = {"isic_id": stem, local.lesion_column: stem}
    if local.diagnosis_column:
        row[local.diagnosis_column] = ""  # the clinician's diagnosis is the label, not a dx code
    if local.collection != COLLECTION_FROM_ID:
        row[local.collection] = EXPORT_COLLECTION
    return {
        **row,
        "confirmed_diagnosis": record.diagnosis,
        "biopsy": record.biopsy,
        "filename": record.filename,
        "recorded": record.time,
        "model_version": record.model_version,
        "sha256": record.sha256,
    }


def _copy_base(base: Path, out: Path, metadata_name: str) -> pd.DataFrame:
    if not base.is_dir():
        raise PipelineError(f"--base: {base} {'is not a folder' if base.exists() else 'does not exist'}")
    if not (base / "Train").is_dir():
        raise PipelineError(f"--base: {base} has no Train/ folder")
    for split in ("Train", "Test"):
        if (base / split).is_dir():
            shutil.copytree(
                base / split, out / split, symlinks=True
            )  # links stay links: the source vets them
    metadata = base / metadata_name
    return pd.read_csv(metadata, dtype=str, keep_default_na=False) if metadata.is_file() else pd.DataFrame()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
