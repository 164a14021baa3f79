"""Predict: class probabilities and melanoma alerts for image files, with an error row per unreadable file."""

from __future__ import annotations

import base64
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

import mlflow
import pandas as pd

from skin_lesion.app.monitoring import OOD_FLAG_MEANING
from skin_lesion.errors import PipelineError
from skin_lesion.images import IMAGE_SUFFIXES, decode_rgb
from skin_lesion.model.classifier import IMAGE_COLUMN, MAX_IMAGE_BYTES, MAX_PIXELS, oversized

BATCH_SIZE = 32  # images encoded and scored at once: bounds memory, not speed


TABLE_ROWS = 20  # rows of the terminal table; the CSV has them all
RECALL = "predicted_label_external_recall"  # how often the version found that class on external sets
# The alert first; the predicted class only beside its measured external recall (or "unmeasured").
SUMMARY_COLUMNS = ["path", "p_melanoma", "melanoma_alert", "predicted_label", RECALL]


def collect_images(paths: Iterable[Path]) -> list[Path]:
    """The image files among `paths`, folders searched recursively, in a stable order."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            # Not only regular files: a FIFO or a dangling link named like an image gets an error row.
            files += sorted(
                p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()
            )
        elif path.exists():
            files.append(path)
        else:
            raise PipelineError(f"{path}: no such file or folder")
    if not files:
        raise PipelineError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, paths))}")
    return files


def predict_files(
    model: mlflow.pyfunc.PyFuncModel, files: Sequence[Path], batch_size: int = BATCH_SIZE
) -> pd.DataFrame:
    """One row per file: path, the model's prediction columns, and an error for unreadable files."""
    encoded, errors = {}, {}
    for path in files:
        try:
            problem = file_problem(path)
            if problem:
                errors[path] = problem
                continue
            decode_rgb(path, max_pixels=MAX_PIXELS)  # from the path, so errors name the file
            data = path.read_bytes()
        except (OSError, PipelineError) as err:
            errors[path] = str(err).split(": ", 1)[-1] if isinstance(err, PipelineError) else str(err)
            continue
        encoded[path] = base64.b64encode(data).decode("ascii")
    frames = []
    readable = list(encoded)
    for start in range(0, len(readable), batch_size):
        batch = readable[start : start + batch_size]
        predicted = model.predict(pd.DataFrame({IMAGE_COLUMN: [encoded[path] for path in batch]}))
        frames.append(predicted.assign(path=[str(path) for path in batch], error=""))
    frames.append(pd.DataFrame({"path": [str(path) for path in errors], "error": list(errors.values())}))
    table = pd.concat(frames, ignore_index=True)
    order = {str(path): index for index, path in enumerate(files)}
    table = table.sort_values("path", key=lambda column: column.map(order), ignore_index=True)
    return table[["path", *[c for c in table.columns if c not in ("path", "error")], "error"]]


def file_problem(path: Path) -> str:
    """Why `path` is not to be opened (not a regular file, over the size limit), or "" to read it."""
    # From stat alone: opening a FIFO blocks until something writes to it, and a device never ends.
    info = path.stat()
    mode = info.st_mode
    if stat.S_ISREG(mode):
        return oversized(MAX_IMAGE_BYTES) if info.st_size > MAX_IMAGE_BYTES else ""
    kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
    return f"not a regular file but {kind}: not read"


def require_a_readable_image(predictions: pd.DataFrame) -> None:
    """Stop, in one line, when not one of the files could be read: there is nothing to act on."""
    if (predictions["error"] != "").all():
        raise PipelineError(f"no image could be read: {_count(len(predictions), 'file')}, all unreadable")


def render_summary(predictions: pd.DataFrame) -> str:
    """A short table for the terminal, then a line per alert (highest P(melanoma) first) and per
    unreadable file, each list cut at TABLE_ROWS.

    A model trained on synthetic shapes says so first and last, where nobody can miss it.
    """
    # With no readable image there are no prediction columns: blank ones, not a KeyError.
    predictions = predictions.reindex(columns=list(dict.fromkeys([*predictions.columns, *SUMMARY_COLUMNS])))
    head = predictions.head(TABLE_ROWS)
    # An unreadable file's row has no prediction: blank cells, not NaN.
    shown = head[SUMMARY_COLUMNS].astype(object).where(head[SUMMARY_COLUMNS].notna(), "")
    # A class no external set had (or a version registered before the figures) was never checked
    # outside its own test split: said so, not left blank.
    shown.loc[head["error"].eq("") & head[RECALL].isna(), RECALL] = "unmeasured"
    shown = shown.rename(columns={RECALL: "external_recall"})
    formatters = {"p_melanoma": _probability, "external_recall": _probability}
    lines = [shown.to_string(index=False, formatters=formatters)]
    if len(predictions) > TABLE_ROWS:
        lines.append(f"... {len(predictions) - TABLE_ROWS} more rows (use --output for all)")
    alerts = predictions[predictions["melanoma_alert"].eq(True)]
    highest_first = alerts.sort_values("p_melanoma", ascending=False, kind="stable")
    lines += [
        f"MELANOMA ALERT p={row.p_melanoma:.3f}  {row.path}"
        for row in highest_first.head(TABLE_ROWS).itertuples()
    ]
    lines += _more(len(alerts), "alerts")
    failed = predictions[predictions["error"] != ""]
    lines += [f"ERROR {row.path}: {row.error}" for row in failed.head(TABLE_ROWS).itertuples()]
    lines += _more(len(failed), "unreadable files")
    lines += unlike_training_lines(predictions)
    lines.append(
        f"{_count(len(predictions), 'image')}, {_count(len(alerts), 'melanoma alert')},"
        f" {len(failed)} unreadable"
    )
    warnings = set(predictions.get("model_warning", pd.Series(dtype=str)).dropna()) - {""}
    for warning in sorted(warnings):
        lines = [f"WARNING: {warning}", *lines, f"WARNING: {warning}"]
    return "\n".join(lines)


def unlike_training_lines(predictions: pd.DataFrame) -> list[str]:
    """A CHECK line per image the OOD score flags (at most TABLE_ROWS), then what the flag means."""
    flagged = predictions[predictions.reindex(columns=["unlike_training"])["unlike_training"].eq(True)]
    if flagged.empty:
        return []
    lines = [
        f"CHECK {row.path}: unlike the training images (OOD score {row.ood_score:.1f})"
        for row in flagged.head(TABLE_ROWS).itertuples()
    ]
    return [*lines, *_more(len(flagged), "flagged images"), f"CHECK: {OOD_FLAG_MEANING}"]


def _more(number: int, what: str) -> list[str]:
    return [f"... {number - TABLE_ROWS} more {what} (use --output for all)"] if number > TABLE_ROWS else []


def _probability(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"
