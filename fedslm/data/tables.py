"""Reading and writing a site's data files (CSV, JSON Lines, Parquet) with validation.

Every problem with a file becomes a ``DataError`` that names the file, the row where there is
one (1-based data row, plus the line for text formats) and what to do about it, because the
person reading it is a site operator looking at their own file, not at this code.
"""

from __future__ import annotations

import csv
import datetime as _dt
import decimal
import hashlib
import io
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedslm.errors import DataError

SUPPORTED_EXTENSIONS: tuple[str, ...] = (".csv", ".jsonl", ".json", ".parquet")
_BOM = b"\xef\xbb\xbf"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Examples:
    """Texts and their labels from one file, for classification."""

    path: Path
    texts: list[str]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class Instructions:
    """Prompts and their target responses from one file, for causal-LM instruction tuning."""

    path: Path
    prompts: list[str]
    responses: list[str]

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass(frozen=True)
class Table:
    """Validated rows of one file, with where each row came from (for later error messages).

    ``columns`` lists every column the file has; ``rows`` hold only the columns asked for
    (required ones, plus optional ones the file has); ``locations[i]`` reads like
    ``"row 3 (line 4)"``.
    """

    path: Path
    columns: list[str]
    rows: list[dict[str, str]]
    locations: list[str]

    def __len__(self) -> int:
        return len(self.rows)


# --------------------------------------------------------------------------------------------
# Reading


def read_rows(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    """Read the given columns of a CSV, JSON Lines or Parquet file (chosen by extension).

    Every value is returned as a non-empty ``str``. Raises ``DataError`` naming the file (and
    the row) for a missing file, an unsupported extension, text that is not UTF-8, an empty
    file, a missing column, an empty/null value, invalid JSON, or a nested value.
    """
    return read_table(path, columns).rows


def read_table(path: Path, columns: Sequence[str], optional: Sequence[str] = ()) -> Table:
    """Like ``read_rows``, but also returns the file's columns and each row's location.

    ``optional`` columns are read (and validated) only if the file has them, so a caller can
    decide what to do when one is absent.
    """
    path = Path(path)
    wanted = list(dict.fromkeys(columns))
    extra = [c for c in dict.fromkeys(optional) if c not in wanted]
    ext = _extension(path)
    if not path.exists():
        raise DataError(
            f"{path}: data file not found; check the path (relative paths in a job config are "
            "resolved against the config file's folder)"
        )
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a data file; point to a {_supported()} file")
    if ext == ".csv":
        return _read_csv(path, wanted, extra)
    if ext in (".jsonl", ".json"):
        return _read_jsonl(path, wanted, extra)
    return _read_parquet(path, wanted, extra)


def read_examples(
    path: Path,
    text_column: str,
    label_column: str,
    labels: Sequence[str] | None = None,
) -> Examples:
    """Read text/label pairs for classification.

    Labels are stripped of surrounding spaces (a stray space would otherwise make a new class).
    If ``labels`` is given, a label outside it is a ``DataError`` naming the row and the label.
    """
    table = read_table(path, [text_column, label_column])
    found = [row[label_column].strip() for row in table.rows]
    if labels is not None:
        check_labels(table.path, found, table.locations, labels, label_column)
    return Examples(path=table.path, texts=[row[text_column] for row in table.rows], labels=found)


def read_instructions(path: Path, prompt_column: str, response_column: str) -> Instructions:
    """Read prompt/response pairs for causal-LM instruction tuning (values kept verbatim)."""
    table = read_table(path, [prompt_column, response_column])
    return Instructions(
        path=table.path,
        prompts=[row[prompt_column] for row in table.rows],
        responses=[row[response_column] for row in table.rows],
    )


def check_labels(
    path: Path,
    found: Sequence[str],
    locations: Sequence[str],
    allowed: Sequence[str],
    label_column: str = "label",
) -> None:
    """Raise ``DataError`` at the first label not in ``allowed``, naming file, row and label."""
    allowed_set = set(allowed)
    for label, where in zip(found, locations, strict=True):
        if label not in allowed_set:
            raise DataError(
                f"{path}: {where}: label {label!r} (column '{label_column}') is not one of "
                f"the job's labels {sorted(allowed_set)}; fix the row or add the label to "
                "data.labels"
            )


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file, read in chunks so large files need little memory."""
    path = Path(path)
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    except FileNotFoundError:
        raise DataError(f"{path}: data file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a data file") from None
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Writing


def write_rows(rows: list[dict[str, str]], path: Path) -> None:
    """Write rows as CSV, JSON Lines or Parquet (by extension), atomically.

    Columns are the first row's keys, in order; every row must have the same keys. Parent
    folders are created. The file appears complete or not at all: it is written to a temporary
    file in the same folder and then renamed over ``path``.
    """
    path = Path(path)
    ext = _extension(path)
    columns = list(rows[0]) if rows else []
    for i, row in enumerate(rows, start=1):
        if list(row) != columns and set(row) != set(columns):
            raise ValueError(f"row {i} has columns {sorted(row)}, expected {columns}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise DataError(f"{path}: cannot write here: {exc.strerror or exc}") from None
    tmp = Path(tmp_name)
    try:
        if ext == ".parquet":
            os.close(fd)
            _write_parquet(rows, columns, tmp)
        else:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
                if ext == ".csv":
                    writer = csv.DictWriter(fh, fieldnames=columns)
                    writer.writeheader()
                    writer.writerows(rows)
                else:
                    for row in rows:
                        fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        # mkstemp makes the file private (0600); data files are ordinary files
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{path}: cannot write here: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_parquet(rows: list[dict[str, str]], columns: list[str], tmp: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({c: pa.array([row[c] for row in rows], type=pa.string()) for c in columns})
    pq.write_table(table, tmp)


# --------------------------------------------------------------------------------------------
# Format readers


def _supported() -> str:
    return ", ".join(SUPPORTED_EXTENSIONS)


def _extension(path: Path) -> str:
    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        shown = f"'{path.suffix}'" if path.suffix else "no extension"
        raise DataError(
            f"{path}: unsupported file type ({shown}); use one of {_supported()} "
            "(.json files are read as JSON Lines: one object per line)"
        )
    return ext


def _decode(path: Path) -> str:
    """The file as text; a UTF-8 BOM is dropped, anything that is not UTF-8 is an error."""
    data = path.read_bytes()
    bom = len(_BOM) if data.startswith(_BOM) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = exc.start + bom
        line = data.count(b"\n", 0, offset) + 1
        hint = ""
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            hint = " (it looks like UTF-16, as some spreadsheet programs save)"
        raise DataError(
            f"{path}: not UTF-8 text{hint}: invalid byte at offset {offset} (line {line}); "
            "re-save the file as UTF-8"
        ) from None


def _missing_columns(path: Path, wanted: list[str], have: Sequence[str]) -> None:
    missing = [c for c in wanted if c not in have]
    if missing:
        names = ", ".join(f"'{c}'" for c in missing)
        existing = ", ".join(f"'{c}'" for c in have) or "(none)"
        noun = "column" if len(missing) == 1 else "columns"
        raise DataError(
            f"{path}: missing {noun} {names}; the file has columns {existing}. Rename the "
            f"{noun} in the file or set the matching data.*_column in the job config"
        )


def _empty_value(path: Path, where: str, column: str) -> DataError:
    return DataError(f"{path}: {where}: column '{column}' is empty; fill it in or remove the row")


def _read_csv(path: Path, wanted: list[str], optional: list[str]) -> Table:
    text = _decode(path)
    if not text.strip():
        raise DataError(f"{path}: the file is empty; it needs a header row and data rows")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
        while not header:
            header = next(reader)
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num}: not valid CSV: {exc}") from None
    header = [h.strip() for h in header]
    for name in wanted + optional:
        if header.count(name) > 1:
            raise DataError(f"{path}: the header has column '{name}' more than once")
    _missing_columns(path, wanted, header)
    use = wanted + [c for c in optional if c in header]
    positions = {c: header.index(c) for c in use}
    rows: list[dict[str, str]] = []
    locations: list[str] = []
    last_line = reader.line_num
    try:
        for record in reader:
            start, last_line = last_line + 1, reader.line_num
            if not record or all(not field.strip() for field in record):
                continue
            where = f"row {len(rows) + 1} (line {start})"
            # trailing empty fields ("a,b,,") are a common spreadsheet export artefact
            if len(record) > len(header) and any(f.strip() for f in record[len(header) :]):
                raise DataError(
                    f"{path}: {where}: has {len(record)} fields but the header has "
                    f"{len(header)}; put values that contain commas in double quotes"
                )
            row: dict[str, str] = {}
            for column, pos in positions.items():
                value = record[pos] if pos < len(record) else ""
                if not value.strip():
                    raise _empty_value(path, where, column)
                row[column] = value
            rows.append(row)
            locations.append(where)
    except csv.Error as exc:
        where = f"row {len(rows) + 1} (line {last_line + 1})"
        if "field larger than field limit" in str(exc):
            # Python's csv module refuses such a field; the quoting may well be fine
            raise DataError(
                f"{path}: {where}: a field is longer than the CSV reader's limit of "
                f"{csv.field_size_limit():,} characters; shorten it (texts are cut to "
                "train.max_length tokens anyway) or remove the row"
            ) from None
        raise DataError(f"{path}: {where}: not valid CSV ({exc}); check the quoting") from None
    if not rows:
        raise DataError(f"{path}: has a header but no data rows")
    return Table(path=path, columns=header, rows=rows, locations=locations)


def _read_jsonl(path: Path, wanted: list[str], optional: list[str]) -> Table:
    text = _decode(path)
    if not text.strip():
        raise DataError(f"{path}: the file is empty; it needs one JSON object per line")
    if text.lstrip().startswith("["):
        raise DataError(
            f"{path}: looks like a JSON array; write one JSON object per line (JSON Lines) instead"
        )
    objects: list[tuple[int, dict[str, Any]]] = []
    seen: dict[str, None] = {}
    # split on "\n" only: str.splitlines would also split on U+2028 inside JSON strings
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}: line {line_no}: invalid JSON ({exc.msg} at column {exc.colno}); "
                "each line must be one complete JSON object"
            ) from None
        if not isinstance(obj, dict):
            raise DataError(
                f'{path}: line {line_no}: expected a JSON object like {{"text": ...}}, '
                f"got {type(obj).__name__}"
            )
        seen.update(dict.fromkeys(obj))
        objects.append((line_no, obj))
    columns = list(seen)
    # a column is "missing" only when no row has it; a row without it has an empty value
    _missing_columns(path, wanted, columns)
    use = wanted + [c for c in optional if c in seen]
    rows: list[dict[str, str]] = []
    locations: list[str] = []
    for index, (line_no, obj) in enumerate(objects, start=1):
        where = f"row {index} (line {line_no})"
        rows.append({c: _cell(path, where, c, obj.get(c)) for c in use})
        locations.append(where)
    return Table(path=path, columns=columns, rows=rows, locations=locations)


def _read_parquet(path: Path, wanted: list[str], optional: list[str]) -> Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        columns = list(parquet.schema_arrow.names)
        _missing_columns(path, wanted, columns)
        use = wanted + [c for c in optional if c in columns]
        table = parquet.read(columns=use)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: has no data rows")
    values = {c: table.column(c).to_pylist() for c in use}
    rows: list[dict[str, str]] = []
    locations: list[str] = []
    for i in range(table.num_rows):
        where = f"row {i + 1}"
        rows.append({c: _cell(path, where, c, values[c][i]) for c in use})
        locations.append(where)
    return Table(path=path, columns=columns, rows=rows, locations=locations)


def _cell(path: Path, where: str, column: str, value: Any) -> str:
    """One JSON/Parquet value as text; nulls, blanks and nested values are errors."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise _empty_value(path, where, column)
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = value
    elif isinstance(value, bytes):
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(
                f"{path}: {where}: column '{column}' holds bytes that are not UTF-8 text"
            ) from None
    elif isinstance(value, int | float | decimal.Decimal | _dt.date | _dt.time | _dt.timedelta):
        text = str(value)
    else:
        kinds: dict[type, str] = {dict: "an object", list: "a list"}
        kind = kinds.get(type(value), type(value).__name__)
        raise DataError(
            f"{path}: {where}: column '{column}' holds {kind}, not text; store a plain "
            "string (or number) in this column"
        )
    if not text.strip():
        raise _empty_value(path, where, column)
    return text
