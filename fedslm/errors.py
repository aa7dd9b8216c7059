"""Error types that carry a message written for the person who has to fix the input.

Every error raised for bad input names where the problem is (file, key, row) and what to do.
The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""

from typing import Any


class FedSLMError(Exception):
    """Base class for errors caused by input from outside the program."""


class ConfigError(FedSLMError):
    """A job config file or a ``--set`` override is invalid."""


class DataError(FedSLMError):
    """A site's data file is missing, unreadable or does not match the job."""


class ModelError(FedSLMError):
    """A base model folder is missing or cannot be used for the job."""


class FederationError(FedSLMError):
    """A round or run cannot proceed (too few sites replied, a bad update arrived)."""


def invalid(source: str, what: str, exc: Any) -> ConfigError:
    """A ``ConfigError`` listing each problem of a pydantic ``ValidationError`` by key:
    "SOURCE: invalid WHAT:" then one "  - key.path: message" line per problem."""
    lines = [f"{source}: invalid {what}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  - {key}: {err['msg']}")
    return ConfigError("\n".join(lines))
