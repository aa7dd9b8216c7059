"""Each site signs its part of the report with its own key; ``verify`` checks the signature.

``sites/SITE/report.sig`` holds an ECDSA P-384 signature (``fedslm.keys``) over the site's name
and the sha256 of the exact bytes of ``sites/SITE/report.json``. The key that must have made it
is one the auditor supplies (``fedslm verify --keys``: the sites' public keys, or the
coordinator's registry of them), never one read from the run being checked: whoever can edit
a run folder can also replace the keys recorded in it (``job.json``) and re-sign. An edited
report, or another site's report copied in its place, fails; a report for whose site the
auditor holds no key is unsigned, and ``verify`` says so.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedslm import keys
from fedslm.artifacts import write_text
from fedslm.keys import SiteKeyError
from fedslm.report.checks.base import Discrepancy

SIGNATURE_FILE = "report.sig"
SITE_KEY_FILE = "site.key"  # the site's private key, in its own folder of the run
SITE_PUBLIC_FILE = "site.pub"  # its public key, as `fedslm site keygen` writes it
REGISTRY_FILE = "sites.json"  # the coordinator's registry of site keys (`add-site`)
_NAME_TAG = "fedslm-site:"  # the comment naming the site in a public key line


@dataclass(frozen=True)
class TrustedKey:
    """A site's public key as the auditor supplied it, and the file it came from."""

    site: str
    key: Any  # ec.EllipticCurvePublicKey
    source: str

    @property
    def fingerprint(self) -> str:
        """``SHA256:…`` as ``ssh-keygen -l`` prints it."""
        return keys.fingerprint(self.key)

    def __str__(self) -> str:
        return f"{self.site} {self.fingerprint} ({self.source})"


def load_trusted_keys(paths: Sequence[Path]) -> dict[str, TrustedKey]:
    """The sites' public keys from the auditor's ``--keys`` arguments, by site name.

    Each path is one of: a coordinator's registry (``sites.json``, as ``fedslm coordinator
    add-site`` keeps it); a public key file (OpenSSH lines; the site is named by a
    ``fedslm-site:NAME`` comment, else by the file, ``NAME.pub`` or ``NAME/site.pub``); or a
    folder holding ``NAME.pub`` files, ``NAME/site.pub`` files (a simulated run's ``sites/``)
    or a ``sites.json``. Raises ``SiteKeyError`` naming the file for anything unreadable, a
    folder with no key, or two different keys for one site.
    """
    found: dict[str, TrustedKey] = {}
    for path in paths:
        for trusted in _keys_at(Path(path)):
            known = found.get(trusted.site)
            if known is not None and known.fingerprint != trusted.fingerprint:
                raise SiteKeyError(
                    f"{trusted.source}: a second, different key for site {trusted.site!r} "
                    f"(the first is in {known.source}); give each site's key once"
                )
            found[trusted.site] = trusted
    return found


def _keys_at(path: Path) -> list[TrustedKey]:
    if path.is_dir():
        out: list[TrustedKey] = []
        for child in sorted(path.iterdir()):
            if child.is_dir() and (child / SITE_PUBLIC_FILE).is_file():
                out += _keys_in_file(child / SITE_PUBLIC_FILE)
            elif child.is_file() and (child.suffix == ".pub" or child.name == REGISTRY_FILE):
                out += _keys_in_file(child)
        if not out:
            raise SiteKeyError(
                f"--keys {path}: no site public key in this folder (expected "
                f"SITE/{SITE_PUBLIC_FILE}, SITE.pub or a coordinator's {REGISTRY_FILE})"
            )
        return out
    if not path.is_file():
        raise SiteKeyError(f"--keys {path}: no such file or folder")
    return _keys_in_file(path)


def _keys_in_file(path: Path) -> list[TrustedKey]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SiteKeyError(f"--keys {path}: cannot read: {exc}") from None
    if path.suffix == ".json":
        return _registry(path, text)
    # the file's own name for a key line that does not name its site
    default = path.parent.name if path.name == SITE_PUBLIC_FILE else path.stem
    out = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        tags = [w[len(_NAME_TAG) :] for w in line.split()[2:] if w.startswith(_NAME_TAG)]
        name = tags[0] if tags and tags[0] else default
        out.append(TrustedKey(name, keys.load_public_key(line, f"{path}, line {i}"), str(path)))
    if not out:
        raise SiteKeyError(f"--keys {path}: holds no public key line")
    return out


def _registry(path: Path, text: str) -> list[TrustedKey]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SiteKeyError(f"--keys {path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SiteKeyError(f"--keys {path}: expected a coordinator's {REGISTRY_FILE} mapping")
    out = []
    for name, entry in data.items():
        line = entry.get("public_key") if isinstance(entry, dict) else entry
        if not isinstance(line, str):
            raise SiteKeyError(f"--keys {path}: site {name!r} has no public_key")
        out.append(TrustedKey(name, keys.load_public_key(line, f"{path}, site {name}"), str(path)))
    return out


def signed_body(site: str, report_json: Path) -> dict[str, str]:
    """What a site's signature covers."""
    return {
        "site": site,
        "report_sha256": hashlib.sha256(report_json.read_bytes()).hexdigest(),
        "algorithm": keys.ALGORITHM,
    }


def sign_site_report(site: str, report_json: Path, private_key: Path) -> Path:
    """Sign ``report_json`` with the site's key; write ``report.sig`` beside it."""
    key = keys.load_private_key(private_key)
    body = signed_body(site, report_json)
    public = key.public_key()
    out = report_json.with_name(SIGNATURE_FILE)
    data = body | {
        "public_key": keys.public_text(public),
        "key_fingerprint": keys.fingerprint(public),
        "signature": keys.sign(key, body),
    }
    write_text(out, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return out


def check_site_signature(
    site: str, report_json: Path, trusted: TrustedKey, shown: str
) -> Discrepancy | None:
    """The first problem with a site report's signature, or None when it verifies with
    ``trusted``, the key the auditor holds for ``site``. A missing signature is a problem
    here: the auditor expects the site to vouch for its report."""
    sig_path = report_json.with_name(SIGNATURE_FILE)
    where = shown.removesuffix("report.json") + SIGNATURE_FILE
    if not sig_path.is_file():
        return Discrepancy(where, site, "signature", note="the site's report is not signed")
    try:
        sig = json.loads(sig_path.read_text(encoding="utf-8"))
        signature = str(sig["signature"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return Discrepancy(where, site, "signature", note=f"unreadable: {exc}")
    if not keys.verify(trusted.key, signed_body(site, report_json), signature):
        return Discrepancy(
            where,
            site,
            "signature",
            sig.get("key_fingerprint") if isinstance(sig, dict) else None,
            trusted.fingerprint,
            note=f"the signature does not match this report with the site's key from "
            f"{trusted.source}: the report was changed, it is another site's, or it was "
            "signed with another key",
            expected_label="your key for the site is",
        )
    return None
