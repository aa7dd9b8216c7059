"""The report's checks and sections live in modules named for what they hold, and the one
registry keeps every check's name and order (a report or verify of an older run names them)."""

from __future__ import annotations

from fedslm.report import checks

# the order reports list them in, and the names older reports carry (verify matches by name)
CHECK_GROUPS = [
    ("ledger-chain", "ledgers"),
    ("ledger-head", "ledgers"),
    ("data-set", "files"),
    ("segments", "accounting"),
    ("site-epsilon", "accounting"),
    ("central-epsilon", "central"),
    ("job-identity", "files"),
    ("policy", "accounting"),
    ("egress-log", "ledgers"),
    ("metrics", "files"),
    ("empirical-bounds", "empirical"),
    ("empirical-claim", "empirical"),
    ("empirical-power", "empirical"),
]


def test_registry_keeps_every_check_name_and_order() -> None:
    assert [c.name for c in checks.CHECKS] == [name for name, _ in CHECK_GROUPS]


def test_each_check_lives_in_its_group_module() -> None:
    for check, (name, group) in zip(checks.CHECKS, CHECK_GROUPS, strict=True):
        assert check.fn.__module__ == f"fedslm.report.checks.{group}", name
