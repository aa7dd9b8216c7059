"""Bad input through the CLI: a clear error naming the file/key/row, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedslm.cli import main

ROOT = Path(__file__).resolve().parents[1]


def job_file(tmp_path: Path, data_yaml: str, extra: str = "") -> Path:
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        "model:\n  name: tiny-bert\nfederation:\n  sites: 2\n  rounds: 1\n"
        f"train:\n  local_steps: 1\n  batch_size: 4\n{extra}data:\n{data_yaml}"
    )
    return cfg


def run_bad(cfg: Path, out: Path, capsys: pytest.CaptureFixture[str], *more: str) -> str:
    code = main(["simulate", str(cfg), "--out", str(out), "-q", *more])
    err = capsys.readouterr().err
    assert code == 2, err
    assert not out.exists(), "a failed run must not leave a half-written output folder"
    return err


def csv(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


ROWS = "".join(f"message number {i} about my card,{'a' if i % 2 else 'b'}\n" for i in range(40))


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (None, ["missing.csv", "not found"]),
        ("", ["empty.csv", "empty"]),
        ("words,label\n" + ROWS, ["bad_col.csv", "text"]),
        (b"text,label\n" + b"caf\xe9 card,a\n" * 40, ["latin1.csv", "UTF-8"]),
        ("text,label\n" + ROWS + "no label here,\n", ["nolabel.csv", "row 41", "label"]),
    ],
)
def test_bad_data_files(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: str | bytes | None,
    fragments: list[str],
) -> None:
    name = fragments[0]
    path = tmp_path / name if content is None else csv(tmp_path, name, content)
    cfg = job_file(tmp_path, f"  path: {path}\n  split:\n    method: iid\n")
    err = run_bad(cfg, tmp_path / "out", capsys)
    for f in fragments:
        assert f in err


def test_unknown_label(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = csv(tmp_path, "data.csv", "text,label\n" + ROWS + "my pin,zzz\n")
    cfg = job_file(tmp_path, f"  path: {path}\n  labels: [a, b]\n  split:\n    method: iid\n")
    err = run_bad(cfg, tmp_path / "out", capsys)
    assert "data.csv" in err and "zzz" in err and "row 41" in err


def test_delta_not_below_one_over_n(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = csv(tmp_path, "data.csv", "text,label\n" + ROWS)
    cfg = job_file(
        tmp_path, f"  path: {path}\n  split:\n    method: iid\n", extra="privacy:\n  delta: 0.1\n"
    )
    err = run_bad(cfg, tmp_path / "out", capsys)
    assert "job.yaml" in err and "privacy.delta" in err and "1/N" in err


def test_secagg_max_weight_below_a_sites_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = csv(tmp_path, "data.csv", "text,label\n" + ROWS)  # 2 sites x 20 rows, 16 to train
    secure = "  secure_aggregation: true\n  secagg:\n    max_weight: 15\n"
    cfg = job_file(tmp_path, f"  path: {path}\n  split:\n    method: iid\n")
    cfg.write_text(cfg.read_text().replace("  rounds: 1\n", "  rounds: 1\n" + secure))
    err = run_bad(cfg, tmp_path / "out", capsys)
    assert "job.yaml (site site-1): federation.secagg.max_weight=15" in err
    assert "16 training records" in err


def test_bad_key_and_bad_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_bad(ROOT / "configs" / "smoke.yaml", tmp_path / "out", capsys, "--set", "lora.r=0")
    assert "smoke.yaml" in err and "lora.r" in err
    err = run_bad(
        ROOT / "configs" / "smoke.yaml", tmp_path / "out", capsys, "--set", "federation.min_sites=9"
    )
    assert "min_sites" in err


def test_existing_run_is_not_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    assert main(["simulate", str(ROOT / "configs" / "smoke.yaml"), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == "{}\n"


def test_synth_writes_a_data_set(tmp_path: Path) -> None:
    out = tmp_path / "bank.csv"
    assert main(["synth", str(out), "--sites", "2", "--rows-per-site", "20"]) == 0
    from fedslm.data import read_rows

    assert len(read_rows(out, ["site", "text", "label"])) == 40


def test_an_old_config_spelling_is_a_plain_warning_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The operator sees what to write instead, as the CLI's other warnings read, not the
    library's file and line."""
    old = "  server_optimizer:\n    name: fedadam\n"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        "model:\n  name: tiny-bert\nfederation:\n  sites: 2\n  rounds: 1\n"
        f"{old}data:\n  path: {tmp_path / 'missing.csv'}\n"
    )
    err = run_bad(cfg, tmp_path / "out", capsys)
    first = err.splitlines()[0]
    assert first == (
        "warning: federation.server_optimizer.name 'fedadam' is an old spelling (it still "
        "loads); write federation.server_optimizer.name 'adam' instead (docs/config.md, "
        "'Renamed keys')"
    )
    assert "FutureWarning" not in err and "config.py" not in err
