"""Typed configuration of a deployment: the coordinator's service file and a site's daemon.

YAML in, validated objects out, as for jobs (``fedslm.config``) and site policies
(``fedslm.policy``). Relative paths are resolved against the file that names them, so a
service can be started from any folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedslm.errors import ConfigError, invalid

Port = Annotated[int, Field(ge=1, le=65535)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSFiles(_Section):
    """The coordinator's TLS material, from ``fedslm certs`` (or the consortium's own CA)."""

    ca_cert: str = Field(description="The CA certificate every site trusts (PEM).")
    cert: str = Field(description="The coordinator's server certificate (PEM).")
    key: str = Field(description="The server certificate's private key (PEM, mode 0600).")


class SuperLinkAddress(_Section):
    """Where the SuperLink listens: the coordinator's private interface. Its port serves the
    site API, the admin (Control) API and the runtime API; the admin API has no authentication
    in open-source Flower, so this address must not be reachable from the sites."""

    host: str = "127.0.0.1"
    port: Port = 9093


class ProxySettings(_Section):
    """The reverse proxy (nginx) that is the only thing sites reach: it serves TLS with the
    coordinator's certificate and forwards ``/v1/fleet/*`` (the site API) to the SuperLink,
    and nothing else."""

    enabled: bool = True
    host: str = Field(default="0.0.0.0", description="The public interface sites dial.")
    port: Port = 9092
    nginx: str = Field(default="/usr/sbin/nginx", description="The nginx program.")


class CoordinatorSettings(_Section):
    """``fedslm coordinator start --config FILE``: one coordinator service."""

    state_dir: str = Field(
        description="Everything the coordinator keeps: SuperLink database, registered sites, "
        "runs (outputs and checkpoints), logs, the generated proxy config."
    )
    tls: TLSFiles
    superlink: SuperLinkAddress = SuperLinkAddress()
    proxy: ProxySettings = ProxySettings()
    models: dict[str, str] = Field(
        default_factory=dict,
        description="Base models by name (model.name in a job) -> local folder, besides the "
        "packaged ones. Nothing is downloaded.",
    )

    @property
    def state(self) -> Path:
        """``state_dir`` as a path."""
        return Path(self.state_dir)


class DaemonSettings(_Section):
    """The ``daemon`` section of a site's policy file: how ``fedslm site start`` connects.

    The site dials out only: the SuperNode connects to ``coordinator``; the site's worker
    listens on a Unix socket in ``state_dir`` and the SuperNode's runtime API on loopback.
    """

    name: str = Field(description="The site's name, as the coordinator registered it.")
    coordinator: str = Field(description="host:port of the coordinator's site API (the proxy).")
    ca_cert: str = Field(
        description="The consortium CA certificate (PEM) the coordinator's "
        "certificate must chain to."
    )
    key: str = Field(description="The site's private key from `fedslm site keygen`.")
    state_dir: str = Field(
        description="The daemon's own folder: worker socket, released "
        "updates kept for replay, logs. Not the data."
    )
    runtime_port: Port = Field(
        default=9094,
        description="Loopback port of the SuperNode's runtime API (one per site on a shared host).",
    )
    poll_interval_s: float = Field(
        default=0.2,
        ge=0.05,
        le=60.0,
        description="While a job runs (a message in the last minute): the longest the "
        "SuperNode waits before asking the coordinator for the next message, or looking for "
        "the ClientApp's reply. Each message waits up to about twice this at the site.",
    )
    idle_poll_interval_s: float = Field(
        default=3.0,
        ge=0.05,
        le=60.0,
        description="Between jobs: how often the SuperNode asks the coordinator for a message "
        "(3 s is Flower's own). The first message of a job waits up to this long.",
    )
    accept_versions: list[str] = Field(
        default_factory=list,
        description="fedslm versions (exact, or a prefix ending in '*', e.g. '0.4.*') of "
        "coordinators whose jobs the site accepts; empty: only its own version.",
    )
    models: dict[str, str] = Field(
        default_factory=dict,
        description="Base models by name (model.name in a job) -> local folder, besides the "
        "packaged ones.",
    )


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """The mapping a YAML file holds; ``ConfigError`` naming the file (and ``what`` it should
    be) when it is missing, not YAML text, or not a mapping."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; give the {what} YAML file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what} file ({exc.strerror})") from None
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {what} is not valid YAML text: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a {what} is a mapping of keys")
    return raw


def load_yaml_settings(
    path: Path, model: type[BaseModel], keys_with_paths: tuple[str, ...], what: str
) -> Any:
    """Read ``path`` into ``model``; relative paths under ``keys_with_paths`` (dotted) are
    resolved against the file's folder. Errors name the file and the key."""
    raw = read_yaml_mapping(path, what)
    base = Path(path).resolve().parent
    for dotted in keys_with_paths:
        *parents, leaf = dotted.split(".")
        node: Any = raw
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        value = node.get(leaf) if isinstance(node, dict) else None
        if isinstance(value, str) and not Path(value).is_absolute():
            node[leaf] = str(base / value)
    models = raw.get("models")
    if isinstance(models, dict):  # name -> folder: folders relative to the file too
        raw["models"] = {
            k: str(base / v) if isinstance(v, str) and not Path(v).is_absolute() else v
            for k, v in models.items()
        }
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise invalid(str(path), what, exc) from None


def load_coordinator_settings(path: Path) -> CoordinatorSettings:
    """Read the coordinator's service file."""
    return load_yaml_settings(
        path,
        CoordinatorSettings,
        ("state_dir", "tls.ca_cert", "tls.cert", "tls.key"),
        "coordinator service file",
    )
