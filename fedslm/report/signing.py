"""Each site signs its part of the report with its own key; ``verify`` checks the signature.

``sites/SITE/report.sig`` holds an ECDSA P-384 signature (``fedslm.keys``) over the site's name
and the sha256 of the exact bytes of ``sites/SITE/report.json``. The key that must have made it
is the one the coordinator registered for that site (``public_key`` in ``job.json``), so an
edited report, or another site's report copied in its place, fails.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fedslm import keys
from fedslm.artifacts import write_text
from fedslm.report.checks import Discrepancy

SIGNATURE_FILE = "report.sig"
SITE_KEY_FILE = "site.key"  # the site's private key, in its own folder of the run


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
    site: str, report_json: Path, registered_key: str | None, shown: str
) -> Discrepancy | None:
    """The first problem with a site report's signature, or None when it verifies.

    ``registered_key`` is the site's public key as the coordinator registered it; with none
    registered (a run without site keys), there is nothing to check against.
    """
    if not registered_key:
        return None
    sig_path = report_json.with_name(SIGNATURE_FILE)
    where = shown.removesuffix("report.json") + SIGNATURE_FILE
    if not sig_path.is_file():
        return Discrepancy(where, site, "signature", note="the site's report is not signed")
    try:
        sig = json.loads(sig_path.read_text(encoding="utf-8"))
        signature = str(sig["signature"])
    except (OSError, ValueError, KeyError) as exc:
        return Discrepancy(where, site, "signature", note=f"unreadable: {exc}")
    key = keys.load_public_key(registered_key, f"job.json public key of {site}")
    if not keys.verify(key, signed_body(site, report_json), signature):
        return Discrepancy(
            where,
            site,
            "signature",
            sig.get("key_fingerprint"),
            keys.fingerprint(key),
            note="the signature does not match this report with the key registered for "
            "the site: the report was changed, or it is another site's",
            expected_label="registered key",
        )
    return None
