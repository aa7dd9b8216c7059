"""The job config: defaults, overrides, and errors that name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedslm.config import JobConfig, load_config
from fedslm.errors import ConfigError
from fedslm.privacy.private_training import check_delta

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_shipped_configs_validate_with_dp_on() -> None:
    shipped = sorted((ROOT / "configs").glob("*.yaml")) + sorted(
        (ROOT / "configs" / "recipes").glob("*.yaml")
    )
    assert {p.name for p in shipped} >= {
        "demo.yaml",
        "smoke.yaml",
        "encoder-dp.yaml",
        "small-sites.yaml",
        "causal-lm-instruct.yaml",
    }
    for path in shipped:
        job = load_config(path)
        assert job.privacy.enabled, path
        assert job.privacy.accountant == "prv", path


def test_the_encoder_recipe_writes_out_the_defaults() -> None:
    """configs/recipes/encoder-dp.yaml documents the defaults: it must not drift from them."""
    recipe = load_config(ROOT / "configs" / "recipes" / "encoder-dp.yaml")
    default = JobConfig.model_validate({"data": recipe.data.model_dump()})
    # the recipe is for DP: it writes the probe's batch that the default resolves to with DP
    probe = default.train.probe.model_copy(
        update={"batch_size": default.train.probe.logical_batch(True)}
    )
    assert recipe.train == default.train.model_copy(update={"mode": "head", "probe": probe})
    assert recipe.train_mode == default.train_mode == "head"
    assert recipe.privacy == default.privacy and recipe.lora == default.lora
    assert recipe.federation.rounds == default.federation.rounds
    assert recipe.federation.aggregation == default.federation.aggregation
    assert recipe.model.model_copy(update={"head_init": "auto"}) == default.model


def test_defaults_are_complete() -> None:
    job = JobConfig()
    assert job.federation.site_names == ["site-1", "site-2", "site-3"]
    assert job.federation.required_sites == 3
    assert job.privacy.enabled and job.privacy.target_epsilon == 8.0


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("train:\n  bach_size: 8\n", "train.bach_size", "did you mean 'train.batch_size'"),
        ("trian:\n  batch_size: 8\n", "trian", "unknown key"),
        ("train:\n  batch_size: many\n", "train.batch_size", "valid integer"),
        ("privacy:\n  target_epsilon: 0\n", "privacy.target_epsilon", "greater than 0"),
        ("privacy:\n  target_epsilon: -1\n", "privacy.target_epsilon", "greater than 0"),
        ("privacy:\n  delta: 1.5\n", "privacy.delta", "less than 1"),
        ("lora:\n  r: 0\n", "lora.r", "greater than or equal to 1"),
        ("federation:\n  sites: 2\n  min_sites: 3\n", "federation", "more than the 2 sites"),
        ("privacy:\n  accountant: gdp\n", "privacy.accountant", "'prv', 'rdp' or 'pld'"),
        ("privacy:\n  target_epsilon: 3\n  noise_multiplier: 1.0\n", "privacy", "not both"),
        ("data:\n  path: a.csv\n  synthetic: {}\n", "data", "exactly one of"),
        ("federation:\n  aggregation: krum\n", "federation.aggregation", "fedavg-factors"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message
    assert key in message
    assert fragment in message


def test_yaml_syntax_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_set_overrides_apply_with_the_same_validation(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  batch_size: 8\n")
    job = load_config(path, ["train.batch_size=16", "federation.sites=[a, b]", "seed=3"])
    assert job.train.batch_size == 16
    assert job.federation.site_names == ["a", "b"]
    assert job.seed == 3
    with pytest.raises(ConfigError) as err:
        load_config(path, ["lora.r=0"])
    assert "lora.r" in str(err.value) and "--set" in str(err.value)
    with pytest.raises(ConfigError, match=r"did you mean 'train\.learning_rate'"):
        load_config(path, ["train.learning_rat=0.1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(path, ["train.batch_size"])


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    sub = tmp_path / "cfg"
    sub.mkdir()
    path = sub / "job.yaml"
    path.write_text("data:\n  path: data/all.csv\n")
    assert load_config(path).data.path == str((sub / "data" / "all.csv").resolve())


def test_delta_must_be_below_one_over_n() -> None:
    job = JobConfig.model_validate({"privacy": {"delta": 1e-3}})
    check_delta(job, 999, "job.yaml")  # 1e-3 < 1/999
    with pytest.raises(ConfigError) as err:
        check_delta(job, 1000, "job.yaml")
    assert "job.yaml" in str(err.value) and "privacy.delta" in str(err.value)


def test_a_validated_config_round_trips_through_its_json() -> None:
    """Simulated sites read the job back from the manifest: it must validate to the same job."""
    for raw in ({"train": {"local_steps": 10}}, {"privacy": {"noise_multiplier": 1.1}}, {}):
        job = JobConfig.model_validate(raw)
        again = JobConfig.model_validate(job.model_dump(mode="json"))
        assert again == job and again.fingerprint() == job.fingerprint()
    assert JobConfig.model_validate({"train": {"local_steps": 10}}).train.local_epochs is None


def test_fingerprint_changes_with_content() -> None:
    a = JobConfig()
    b = JobConfig.model_validate({"seed": 1})
    assert a.fingerprint() == JobConfig().fingerprint() != b.fingerprint()
