"""The server-optimizer rename (docs/config.md, "Renamed keys").

``federation.server_optimizer.name`` fedavg/fedavgm/fedadam/fedyogi are now sgd/sgdm/adam/yogi,
and ``fedprox`` is ``sgd`` with ``train.proximal_mu``. Old spellings load, with one
FutureWarning that names the old key and the new spelling, as the same job; a config that
spells FedProx both ways is refused; and every job that could be written before the rename
keeps its fingerprint, and with it its job id, its sites' noise seeds and its stored releases.
The fingerprints and job.json configs below were computed and written by fedslm at 7f4a7a7,
before the rename.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest

from fedslm.config import JobConfig, config_fingerprint, load_config, validate_config
from fedslm.errors import ConfigError
from fedslm.report.checks.files import job_config_sha256

BEFORE = json.loads((Path(__file__).parent / "job_configs_before_rename.json").read_text())

DEFAULT_FINGERPRINT = "b8732c6df4de2fd87577a54a18f1717d90afa71ab96d85b41ed8134fcb43da24"


def opt(**server_optimizer: Any) -> dict[str, Any]:
    return {"server_optimizer": server_optimizer}


# case: (federation in the old spelling, the same job in the new spelling, fingerprint before)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "fedavg": (
        {"federation": opt(name="fedavg")},
        {"federation": opt(name="sgd")},
        DEFAULT_FINGERPRINT,
    ),
    "fedavg-lr": (
        {"federation": opt(name="fedavg", learning_rate=0.5)},
        {"federation": opt(name="sgd", learning_rate=0.5)},
        "fdeafee0d73df30278beba928bf982e382096d7f0f81376cdf918b5727ea1bec",
    ),
    "fedprox": (
        {"federation": opt(name="fedprox")},
        {"train": {"proximal_mu": 0.01}},
        "3f41e0e0d8e3cbf1ec750cc7566d571562e9111febf174290380d10f071c9640",
    ),
    "fedprox-mu": (
        {"federation": opt(name="fedprox", proximal_mu=0.1)},
        {"train": {"proximal_mu": 0.1}},
        "92ad26c9cd3049a2a4dc49d42140e0cced65e65c3a2e2eec8c8824200946cab6",
    ),
    "fedprox-lr-mu": (
        {"federation": opt(name="fedprox", learning_rate=0.5, proximal_mu=1.0)},
        {"federation": opt(learning_rate=0.5), "train": {"proximal_mu": 1.0}},
        "40d887e980280db9b5f5233273717a57ed6bb6f9a717078883aede13634edd56",
    ),
    "fedprox-exact": (
        {"federation": {"aggregation": "exact", **opt(name="fedprox", proximal_mu=0.05)}},
        {"federation": {"aggregation": "exact"}, "train": {"proximal_mu": 0.05}},
        "65c45547f4d1f48391697ccdf92fb15b9eae2cf6251fa1847b20add3cef65407",
    ),
    "fedprox-secagg": (
        {"federation": {"secure_aggregation": True, **opt(name="fedprox")}},
        {"federation": {"secure_aggregation": True}, "train": {"proximal_mu": 0.01}},
        "2c9c745c56af64a3e88de5074aa6e2ccfd5315167b307a88457647896a4895f3",
    ),
    "fedavgm": (
        {"federation": opt(name="fedavgm")},
        {"federation": opt(name="sgdm")},
        "4f213428d21d8a42cc472a38a9447a2d260eabef50fd9b8fe68724620d0fa140",
    ),
    "fedavgm-set": (
        {"federation": opt(name="fedavgm", learning_rate=0.7, momentum=0.5)},
        {"federation": opt(name="sgdm", learning_rate=0.7, momentum=0.5)},
        "5b9fd1ac757a3b8dcd8271b0d6cd463dd03c2bdd453256e396392fe44673782f",
    ),
    "fedadam": (
        {"federation": opt(name="fedadam")},
        {"federation": opt(name="adam")},
        "c0a0bd413f85c7b04d509e1b97ebf704056cc9ca780636e9be389724d00e56f2",
    ),
    "fedadam-set": (
        {
            "federation": {
                "aggregation": "ffa",
                **opt(name="fedadam", learning_rate=0.05, beta1=0.5, beta2=0.9, tau=0.01),
            }
        },
        {
            "federation": {
                "aggregation": "ffa",
                **opt(name="adam", learning_rate=0.05, beta1=0.5, beta2=0.9, tau=0.01),
            }
        },
        "0333df4b27ac989cc77e742032cc72a410c8ff75a5931f8b3db9afd2ee2f331b",
    ),
    "fedyogi": (
        {"federation": opt(name="fedyogi")},
        {"federation": opt(name="yogi")},
        "4fc1019a20299756ebc7e8885102b619243377d98450e08549b0d2300dd14178",
    ),
    "fedyogi-set": (
        {
            "federation": {
                "aggregation": "fedavg-factors",
                **opt(name="fedyogi", learning_rate=0.02),
            }
        },
        {"federation": {"aggregation": "fedavg-factors", **opt(name="yogi", learning_rate=0.02)}},
        "f737f231ee1c0556df6137432704e84ffd2eef7d4f455e01ddd2952e6813fcec",
    ),
}
OLD_FINGERPRINTS = {fp for _, _, fp in CASES.values()}


def quietly(raw: dict[str, Any]) -> JobConfig:
    """Validate ``raw``, failing on any warning (the new spelling must not warn)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return validate_config(json.loads(json.dumps(raw)), source="job.yaml")


def test_the_default_job_keeps_its_fingerprint_and_warns_nothing() -> None:
    assert quietly({}).fingerprint() == JobConfig().fingerprint() == DEFAULT_FINGERPRINT
    assert JobConfig().federation.server_optimizer.name == "sgd"
    assert JobConfig().train.proximal_mu is None


@pytest.mark.parametrize("case", list(CASES))
def test_an_old_spelling_loads_as_the_new_one_with_its_old_fingerprint(case: str) -> None:
    old, new, fingerprint = CASES[case]
    with pytest.warns(FutureWarning) as caught:
        job = validate_config(json.loads(json.dumps(old)), source="job.yaml")
    (warning,) = [w for w in caught if issubclass(w.category, FutureWarning)]
    name = old["federation"]["server_optimizer"]["name"]
    text = str(warning.message)
    assert text.startswith(f"federation.server_optimizer.name {name!r}")
    assert "is an old spelling (it still loads)" in text
    expected = (
        "train.proximal_mu" if name == "fedprox" else repr(job.federation.server_optimizer.name)
    )
    assert expected in text and "Renamed keys" in text
    assert job == quietly(new)
    assert job.fingerprint() == quietly(new).fingerprint() == fingerprint
    # the report's check hashes job.json's copy (the new spelling) the same way
    assert job_config_sha256(job.model_dump(mode="json")) == fingerprint


def test_fedprox_keeps_what_it_meant() -> None:
    with pytest.warns(FutureWarning, match="train.proximal_mu: 0.01"):
        job = validate_config({"federation": opt(name="fedprox")})
    assert job.train.proximal_mu == 0.01  # the old default strength
    assert job.federation.server_optimizer.hyperparameters() == {"lr": 1.0}
    with pytest.warns(
        FutureWarning, match="'fedprox' with federation.server_optimizer.proximal_mu is"
    ):
        job = validate_config({"federation": opt(name="fedprox", proximal_mu=2)})
    assert job.train.proximal_mu == 2.0 and job.federation.server_optimizer.name == "sgd"


def test_fedprox_spelling_out_its_default_mu_hashes_as_leaving_it_out() -> None:
    """The one config whose fingerprint moves: ``proximal_mu: 0.01`` written out (before:
    b312a9d5…) is the same job as leaving it out, and the new spelling has one form for both."""
    with pytest.warns(FutureWarning):
        job = validate_config({"federation": opt(name="fedprox", proximal_mu=0.01)})
    assert job.fingerprint() == CASES["fedprox"][2]


@pytest.mark.parametrize("case", list(BEFORE))
def test_job_json_written_before_the_rename_validates_and_hashes_as_before(case: str) -> None:
    """job.json of an older run: what resume, ``fedslm report`` and ``fedslm verify`` read."""
    config = BEFORE[case]
    fingerprint = {
        "default": DEFAULT_FINGERPRINT,
        "fedprox": CASES["fedprox"][2],
        "fedprox_mu": CASES["fedprox-mu"][2],
        "fedadam_set": CASES["fedadam-set"][2],
    }[case]
    assert config_fingerprint(config) == job_config_sha256(config) == fingerprint
    with pytest.warns(FutureWarning, match="is an old spelling"):
        job = JobConfig.model_validate(config)
    assert job.fingerprint() == fingerprint
    # written again by this version (the new spelling), it is still the same job
    again = quietly(job.model_dump(mode="json"))
    assert again == job and again.fingerprint() == fingerprint
    assert "proximal_mu" not in job.model_dump(mode="json")["federation"]["server_optimizer"]


def test_fedprox_in_both_spellings_is_refused_naming_both_keys(tmp_path: Path) -> None:
    both = {"federation": opt(name="fedprox"), "train": {"proximal_mu": 0.1}}
    with pytest.raises(ConfigError) as err:
        validate_config(both, source="job.yaml")
    text = str(err.value)
    assert "job.yaml" in text
    assert "federation.server_optimizer.name 'fedprox'" in text and "train.proximal_mu" in text
    both["federation"]["server_optimizer"]["proximal_mu"] = 0.2
    with pytest.raises(
        ConfigError, match=r"and federation\.server_optimizer\.proximal_mu and keep"
    ):
        validate_config(both, source="job.yaml")
    # from a file and from --set alike
    path = tmp_path / "job.yaml"
    path.write_text("train:\n  proximal_mu: 0.1\n")
    with pytest.raises(ConfigError, match=f"(?s){path}.*'fedprox'.*train.proximal_mu"):
        load_config(path, ["federation.server_optimizer.name=fedprox"])


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_proximal_mu_under_the_server_optimizer_points_to_train(name: str) -> None:
    with pytest.raises(ConfigError, match=r"is now train\.proximal_mu"):
        validate_config({"federation": opt(name=name, proximal_mu=0.1)}, source="job.yaml")


def test_an_old_fedprox_strength_that_is_not_a_positive_number_names_the_old_key() -> None:
    with pytest.raises(ConfigError, match=r"federation.server_optimizer.proximal_mu must be"):
        validate_config({"federation": opt(name="fedprox", proximal_mu=-1)}, source="job.yaml")
    with pytest.raises(ConfigError, match=r"train.proximal_mu: Input should be greater than 0"):
        validate_config({"train": {"proximal_mu": 0}}, source="job.yaml")


def test_fedprox_combines_with_every_server_optimizer_and_hashes_apart() -> None:
    """FedProx runs at the sites, so it goes with any server optimizer (a job the old spelling
    could not express); such a job hashes apart from every job of before."""
    seen = set(OLD_FINGERPRINTS)
    for name in ("sgd", "sgdm", "adam", "yogi"):
        for mu in (0.01, 0.3):
            job = quietly({"federation": opt(name=name), "train": {"proximal_mu": mu}})
            fingerprint = job.fingerprint()
            if name == "sgd":  # what fedprox was
                fedprox = {0.01: CASES["fedprox"][2]}.get(mu)
                assert fedprox is None or fingerprint == fedprox
            else:
                assert fingerprint not in seen
            seen.add(fingerprint)
            assert job_config_sha256(job.model_dump(mode="json")) == fingerprint
            assert quietly(job.model_dump(mode="json")) == job
    assert len(seen) == len(OLD_FINGERPRINTS) + 7  # 8 new jobs, sgd + 0.01 was fedprox


def test_exact_and_secure_aggregation_with_fedprox() -> None:
    # exact takes the stateless server step only, with or without FedProx at the sites
    quietly({"federation": {"aggregation": "exact"}, "train": {"proximal_mu": 0.1}})
    with pytest.raises(ConfigError, match="use sgd with exact"):
        quietly({"federation": {"aggregation": "exact", **opt(name="adam")}})
    # secure aggregation hides single updates, which FedProx (at the site) never needs
    for name in ("sgd", "adam"):
        secure = {"secure_aggregation": True, **opt(name=name)}
        quietly({"federation": secure, "train": {"proximal_mu": 0.1}})
