"""Each simulated site's train/eval files, from a validated ``DataConfig``.

Sources: the shipped synthetic data set, one file split into the sites, or one file per site.
Every source is read and validated first and only then are files written, so a bad row in one
site's file leaves nothing half-written behind.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fedslm.config import DataConfig
from fedslm.data.split import split_by_column, split_dirichlet, split_iid, train_eval_split
from fedslm.data.synthetic import generate_bank_messages
from fedslm.data.tables import check_labels, read_rows, read_table, write_rows
from fedslm.errors import DataError

TASKS = ("classification", "causal-lm")


@dataclass(frozen=True)
class SiteFiles:
    """Where one site's prepared data lives."""

    name: str
    train: Path
    eval: Path


@dataclass(frozen=True)
class _SiteRows:
    """One site's validated rows (only the task's columns) and their labels, if known."""

    name: str
    source: str
    rows: list[dict[str, str]]
    labels: list[str] | None


def _derive_seed(seed: int, *parts: str) -> int:
    # a stable per-site seed (Python's hash() differs between processes)
    blob = "/".join([str(seed), *parts]).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big")


def _task_columns(data: DataConfig, task: str) -> list[str]:
    if task == "classification":
        return [data.text_column, data.label_column]
    if task == "causal-lm":
        return [data.prompt_column, data.response_column]
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


@dataclass(frozen=True)
class SitePlan:
    """One site's validated rows, projected to the task's columns and split into train and
    eval, held in memory until ``write_sites`` puts them on disk."""

    name: str
    train: list[dict[str, str]]
    eval: list[dict[str, str]]
    # the training rows' labels (classification), else None
    train_labels: list[str] | None


def plan_sites(data: DataConfig, site_names: list[str], task: str, seed: int) -> list[SitePlan]:
    """Read, validate and split every site's rows without writing anything.

    Raises ``DataError`` naming the file and row for any bad input. What ``materialize_sites``
    writes is exactly these rows; a caller that must not touch the disk before the whole job is
    known to be valid (``fedslm simulate --overwrite``) plans first and writes later.
    """
    if not site_names:
        raise DataError("there are no sites; set federation.sites")
    columns = _task_columns(data, task)
    if data.synthetic is not None:
        sites = _from_synthetic(data, site_names, task, seed)
    elif data.path is not None:
        sites = _from_one_file(data, Path(data.path), site_names, task, seed)
    else:
        assert data.sites is not None
        sites = _from_site_files(data, site_names, task)

    plans: list[SitePlan] = []
    problems: list[str] = []
    for site in sites:
        try:
            train, held = split_site(len(site.rows), site.labels, data, seed, site.name)
        except DataError as exc:
            problems.append(f"site '{site.name}' ({site.source}): {exc}")
            continue
        labels = (
            [site.rows[i][data.label_column] for i in train] if task == "classification" else None
        )
        plans.append(
            SitePlan(
                site.name,
                [_project(site.rows[i], columns) for i in train],
                [_project(site.rows[i], columns) for i in held],
                labels,
            )
        )
    if problems:
        raise DataError("\n".join(problems))
    return plans


def write_sites(plans: list[SitePlan], out_dir: Path) -> list[SiteFiles]:
    """Write ``out_dir/<site>/data/{train,eval}.jsonl`` for every planned site."""
    out: list[SiteFiles] = []
    for plan in plans:
        folder = Path(out_dir) / plan.name / "data"
        files = SiteFiles(plan.name, folder / "train.jsonl", folder / "eval.jsonl")
        write_rows(plan.train, files.train)
        write_rows(plan.eval, files.eval)
        out.append(files)
    return out


def materialize_sites(
    data: DataConfig, site_names: list[str], task: str, seed: int, out_dir: Path
) -> list[SiteFiles]:
    """Write ``out_dir/<site>/data/{train,eval}.jsonl`` for every site and return their paths.

    Classification files hold the text and label columns, causal-LM files the prompt and
    response columns (named as in ``data``). Each site's rows are split into train/eval with
    ``data.eval_fraction`` (stratified by label when labels are known). Raises ``DataError``
    naming the file and row for any bad input, before anything is written.
    """
    return write_sites(plan_sites(data, site_names, task, seed), out_dir)


def _project(row: dict[str, str], columns: list[str]) -> dict[str, str]:
    return {c: row[c] for c in columns}


def _from_synthetic(
    data: DataConfig, site_names: list[str], task: str, seed: int
) -> list[_SiteRows]:
    assert data.synthetic is not None
    generated = generate_bank_messages(
        site_names, data.synthetic.rows_per_site, seed, data.synthetic.skew
    )
    if task == "classification" and data.labels is not None:
        allowed = set(data.labels)
        unknown = sorted({r["label"] for r in generated} - allowed)
        if unknown:
            raise DataError(
                f"the synthetic data set has labels {unknown} that are not in data.labels; "
                "remove data.labels or list all intents in it"
            )
    parts = split_by_column([r["site"] for r in generated], site_names)
    sites: list[_SiteRows] = []
    for name, part in zip(site_names, parts, strict=True):
        rows = [
            {
                data.text_column: generated[i]["text"],
                data.label_column: generated[i]["label"],
                data.prompt_column: generated[i]["prompt"],
                data.response_column: generated[i]["response"],
            }
            for i in part
        ]
        # the synthetic labels are always known, so eval stays stratified for causal-LM too
        labels = [generated[i]["label"] for i in part]
        sites.append(_SiteRows(name, "synthetic data", rows, labels))
    return sites


def _labels_of(
    data: DataConfig, task: str, path: Path, rows: list[dict[str, str]], locations: list[str]
) -> list[str] | None:
    """Stripped labels for classification (checked against ``data.labels``), else None."""
    if task != "classification":
        return None
    labels = [row[data.label_column].strip() for row in rows]
    for row, label in zip(rows, labels, strict=True):
        row[data.label_column] = label
    if data.labels is not None:
        check_labels(path, labels, locations, data.labels, data.label_column)
    return labels


def _from_one_file(
    data: DataConfig, path: Path, site_names: list[str], task: str, seed: int
) -> list[_SiteRows]:
    method = data.split.method
    needed = _task_columns(data, task)
    if method == "dirichlet" and task == "causal-lm":
        table = read_table(path, needed, optional=[data.label_column])
        if data.label_column not in table.columns:
            raise DataError(
                f"{path}: data.split.method is 'dirichlet', which splits by label, but the file "
                f"has no label column '{data.label_column}'; add one (or set "
                "data.label_column), or use data.split.method: iid"
            )
        labels: list[str] | None = [r[data.label_column].strip() for r in table.rows]
    else:
        extra = [data.split.column] if method == "column" else []
        table = read_table(path, [*needed, *extra])
        labels = _labels_of(data, task, path, table.rows, table.locations)
    k = len(site_names)
    try:
        if method == "iid":
            parts = split_iid(len(table), k, seed)
        elif method == "dirichlet":
            assert labels is not None
            parts = split_dirichlet(labels, k, data.split.alpha, seed)
        else:
            parts = split_by_column([r[data.split.column] for r in table.rows], site_names)
    except DataError as exc:
        where = f"column '{data.split.column}'" if method == "column" else f"{method} split"
        raise DataError(f"{path}: {where}: {exc}") from None
    return [
        _SiteRows(
            name,
            str(path),
            [table.rows[i] for i in part],
            None if labels is None else [labels[i] for i in part],
        )
        for name, part in zip(site_names, parts, strict=True)
    ]


def _from_site_files(data: DataConfig, site_names: list[str], task: str) -> list[_SiteRows]:
    assert data.sites is not None
    unknown = [name for name in site_names if name not in data.sites]
    if unknown:
        raise DataError(
            f"no data file for site(s) {unknown} in data.sites (it has {sorted(data.sites)})"
        )
    sites: list[_SiteRows] = []
    problems: list[str] = []
    # read every site before failing, so one run reports every bad file
    for name in site_names:
        path = Path(data.sites[name])
        try:
            table = read_table(path, _task_columns(data, task))
            labels = _labels_of(data, task, path, table.rows, table.locations)
        except DataError as exc:
            problems.append(str(exc))
            continue
        sites.append(_SiteRows(name, str(path), table.rows, labels))
    if problems:
        raise DataError("\n".join(problems))
    return sites


def split_site(
    n: int, labels: list[str] | None, data: DataConfig, seed: int, site: str
) -> tuple[list[int], list[int]]:
    """A site's rows split into (train, eval) indices: ``data.eval_fraction`` held out,
    stratified by ``labels`` when known, seeded by the job's seed and the site's name, so a
    simulated site and a deployed site of that name split the same rows alike."""
    return train_eval_split(n, data.eval_fraction, _derive_seed(seed, site, "eval"), labels)


def read_site_file(
    path: Path, data: DataConfig, task: str
) -> tuple[list[dict[str, str]], list[str] | None]:
    """A deployed site's own data file, read for a job: the task's columns of every row
    (validated), and for classification the stripped labels, each one of ``data.labels``.
    ``DataError`` names the file, the row and what to fix."""
    columns = _task_columns(data, task)
    table = read_table(path, columns)
    labels = _labels_of(data, task, Path(path), table.rows, table.locations)
    return [_project(row, columns) for row in table.rows], labels


# Warn when at least this share of a site's evaluation rows repeat a training row: a few
# repeated short phrases are common in real text and move an evaluation little.
DUPLICATE_SHARE = 0.01


def text_columns(data: DataConfig, task: str) -> list[str]:
    """The columns that make a row's text (what a model reads and may memorise): the text
    for classification (a label is not text), prompt and response for causal LM."""
    if task == "classification":
        return [data.text_column]
    return [data.prompt_column, data.response_column]


def _text_key(row: dict[str, str], columns: list[str]) -> bytes:
    # whitespace-normalised, hashed: the set of training texts is kept small in memory
    text = "\0".join(" ".join(row[c].split()) for c in columns)
    return hashlib.sha256(text.encode("utf-8")).digest()


def duplicate_warning(
    site: str,
    source: str,
    train: list[dict[str, str]],
    held_out: list[dict[str, str]],
    data: DataConfig,
    task: str,
) -> str | None:
    """A warning when evaluation rows repeat training rows (same text after collapsing
    whitespace), else None: such an evaluation partly measures memorised training rows (a
    file with every row three times gives an evaluation that is mostly training rows)."""
    columns = text_columns(data, task)
    seen = {_text_key(r, columns) for r in train}
    repeated = sum(_text_key(r, columns) in seen for r in held_out)
    if not held_out or repeated < max(1, DUPLICATE_SHARE * len(held_out)):
        return None
    return (
        f"site {site}: {repeated} of {len(held_out)} evaluation rows "
        f"({repeated / len(held_out):.0%}) repeat a training row of {source} (the same "
        f"{' and '.join(columns)}, whitespace aside), so its evaluation figures partly measure "
        "memorised training rows. Remove the duplicate rows from the data file (keep one of "
        "each text) before training."
    )


def planned_labels(plans: list[SitePlan]) -> list[str]:
    """The sorted union of the labels in the planned sites' training rows (what
    ``infer_labels`` reads back from the written files)."""
    return sorted({label for p in plans for label in (p.train_labels or [])})


def infer_labels(files: list[SiteFiles], label_column: str) -> list[str]:
    """The sorted union of the labels in the sites' training files."""
    found: set[str] = set()
    for site in files:
        found.update(row[label_column] for row in read_rows(site.train, [label_column]))
    return sorted(found)
