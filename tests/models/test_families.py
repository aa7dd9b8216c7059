"""Every supported model family works with federated DP-LoRA out of the box.

For each family's tiny model (random weights, built offline): the family defaults resolve and
LoRA lands on the intended layers; right padding keeps each example's output independent of its
batch; one federated round with DP on runs through two ``Site`` objects and the ``Coordinator``
and changes the adapter; the exported adapter reloads with plain PEFT and gives the same
outputs; and with noise off, Opacus' clipped per-sample gradients equal one-example-at-a-time
clipping. Plus the errors: unknown family, encoder as causal LM, layers Opacus cannot handle.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from support import prepare_parity_model as _prepare
from support import reference_update as _reference

from fedslm.batching import (
    Encoded,
    PromptTemplate,
    collate,
    encode_classification,
    encode_instructions,
)
from fedslm.config import JobConfig, LoraConfig, ModelConfig
from fedslm.errors import ModelError
from fedslm.losses import per_example_loss
from fedslm.models import get_adapter_state, load_model
from fedslm.models.families import FAMILIES, check_new_weights_saved
from fedslm.models.memory import REFERENCE_MODELS, estimate_site_memory, lora_params
from fedslm.models.tiny import TINY_MODELS, ensure_tiny_model
from fedslm.privacy.dp_sgd import dp_optimizer, per_sample_module

pytestmark = pytest.mark.integration

CPU = torch.device("cpu")
LABELS = ["card", "pin", "transfer"]
ENCODERS = ("bert", "distilbert", "mobilebert")
DECODERS = tuple(t for t in FAMILIES if t not in ENCODERS)
# tiny tokenizers that ship a chat template
CHAT = {"qwen2", "phi3", "gemma", "gemma2", "gemma3_text"}

# (model_type, task): encoders classify; decoders are causal LMs and classifiers. The family
# table's classification head is pooling 'model'; MEAN_CASES run the same checks on fedslm's
# default mean-pooling head.
CASES = [(t, "classification") for t in ENCODERS] + [
    (t, task) for t in DECODERS for task in ("causal-lm", "classification")
]
IDS = [f"{t}-{'lm' if task == 'causal-lm' else 'cls'}" for t, task in CASES]
FAMILY_HEAD = ModelConfig(pooling="model")
MEAN_CASES = [(t, "classification-mean") for t in (*ENCODERS, *DECODERS)]
ALL_CASES = CASES + MEAN_CASES
ALL_IDS = IDS + [f"{t}-mean" for t, _ in MEAN_CASES]


def _task(case_task: str) -> tuple[str, ModelConfig | None]:
    """The task and model options of a case: the family head unless the case says mean."""
    if case_task == "classification-mean":
        return "classification", ModelConfig()
    return case_task, FAMILY_HEAD if case_task == "classification" else None


@pytest.fixture(scope="session")
def tiny_models(fedslm_home: Path) -> dict[str, Path]:
    """model_type -> folder of its tiny model (built once per session)."""
    return {
        name.removeprefix("tiny-"): ensure_tiny_model(name, fedslm_home / "models")
        for name in TINY_MODELS
    }


def test_tiny_bert_is_the_same_on_every_build(tmp_path: Path) -> None:
    """Two builds in two processes give the same tokenizer and weights. tokenizers' WordPiece
    trainer broke ties in a hash-map order that is random per process: builds differed by ~30
    tokens, and a test's figures with them from one session to the next."""
    import hashlib
    import subprocess
    import sys

    def build(folder: Path) -> dict[str, str]:
        code = (
            "import sys; from pathlib import Path; "
            "from fedslm.models.tiny import build_tiny_model; "
            "build_tiny_model('tiny-bert', Path(sys.argv[1]))"
        )
        subprocess.run([sys.executable, "-c", code, str(folder)], check=True, timeout=300)
        return {
            f.name: hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.iterdir())
            if f.name in ("tokenizer.json", "model.safetensors")
        }

    first, second = build(tmp_path / "a"), build(tmp_path / "b")
    assert set(first) == {"tokenizer.json", "model.safetensors"} and first == second


def test_every_family_has_a_tiny_model() -> None:
    assert {n.removeprefix("tiny-") for n in TINY_MODELS} == set(FAMILIES)


def _texts(loaded, task: str, n: int = 4) -> Encoded:
    """``n`` short rows of different lengths, encoded for ``loaded``'s task and template."""
    texts = ["my card was lost", "reset my pin please", "why was my transfer declined?", "hi"]
    labels = [LABELS[i % len(LABELS)] for i in range(n)]
    tok = loaded.tokenizer
    if task == "classification":
        return encode_classification(
            tok, texts[:n], labels, {k: i for i, k in enumerate(LABELS)}, 16
        )
    return encode_instructions(
        tok,
        [f"Message: {t}\nIntent:" for t in texts[:n]],
        [f" {x}" for x in labels],
        24,
        loaded.prompt_template,
    )


# -- (a) defaults --------------------------------------------------------------------------


@pytest.mark.parametrize(("model_type", "task"), CASES, ids=IDS)
def test_defaults_resolve_and_lora_attaches_to_the_intended_layers(
    model_type: str, task: str, tiny_models: dict[str, Path]
) -> None:
    family = FAMILIES[model_type]
    loaded = load_model(
        tiny_models[model_type], task, LoraConfig(r=4), LABELS, CPU, seed=0, options=_task(task)[1]
    )
    d = loaded.defaults
    assert d is not None and d.family == model_type == loaded.family
    assert d.lora_targets == family.lora_targets
    assert d.padding_side == "right" == loaded.tokenizer.padding_side
    assert loaded.tokenizer.pad_token_id is not None
    assert loaded.model.config.pad_token_id == loaded.tokenizer.pad_token_id

    # LoRA sits on every layer named by the targets and nowhere else
    from peft.tuners.lora import LoraLayer

    lora = {n for n, m in loaded.model.named_modules() if isinstance(m, LoraLayer)}
    assert lora and {n.rsplit(".", 1)[-1] for n in lora} == set(family.lora_targets)
    assert len(lora) == loaded.model.config.num_hidden_layers * len(family.lora_targets)

    # only LoRA factors and (classification) the head train; embeddings never
    trainable = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    state = get_adapter_state(loaded.model)
    head = [n for n in trainable if "lora_" not in n]
    if task == "classification":
        assert d.head == family.head and loaded.prompt_template is None
        assert {n.split(".modules_to_save")[0].rsplit(".", 1)[-1] for n in head} == set(family.head)
        assert all(any(k.endswith(f"{h}.weight") for k in state) for h in family.head)
    else:
        assert head == [] and d.head == ()
        kind = "chat" if model_type in CHAT else "plain"
        assert loaded.prompt_template == (
            PromptTemplate("chat")
            if kind == "chat"
            else PromptTemplate("plain", family.plain_template)
        )
    assert not any("embed" in n or "wte" in n or "wpe" in n for n in trainable)
    assert len(state) == len(trainable)
    assert loaded.model.peft_config["default"].fan_in_fan_out == family.conv1d


@pytest.mark.parametrize(("model_type", "task"), ALL_CASES, ids=ALL_IDS)
def test_right_padding_keeps_each_example_independent_of_its_batch(
    model_type: str, task: str, tiny_models: dict[str, Path]
) -> None:
    """What DP-SGD's per-example sensitivity needs: a row's output is the same alone and
    padded into a batch with longer rows."""
    task, options = _task(task)
    loaded = load_model(
        tiny_models[model_type], task, LoraConfig(r=4), LABELS, CPU, seed=0, options=options
    )
    model = loaded.model.eval()
    data = _texts(loaded, task)
    with torch.no_grad():
        together = model(
            **{k: v for k, v in collate(data, [0, 1, 2, 3], CPU).items() if k != "labels"}
        ).logits
        for i in range(len(data)):
            alone = model(
                **{k: v for k, v in collate(data, [i], CPU).items() if k != "labels"}
            ).logits
            n = len(data.input_ids[i])
            got = together[i] if task == "classification" else together[i, :n]
            torch.testing.assert_close(got, alone[0], rtol=1e-4, atol=1e-5)


def test_chat_template_masks_the_prompt_and_keeps_the_end_of_turn(
    tiny_models: dict[str, Path],
) -> None:
    loaded = load_model(tiny_models["qwen2"], "causal-lm", LoraConfig(r=4), [], CPU, seed=0)
    tok = loaded.tokenizer
    data = encode_instructions(
        tok, ["Message: hi\nIntent:"], [" greeting"], 64, loaded.prompt_template
    )
    ids, targets = data.input_ids[0], data.targets[0]
    labelled = [t for t in targets if t != -100]
    assert tok.decode(ids[: len(ids) - len(labelled)]).endswith("<|im_start|>assistant\n")
    assert tok.decode(labelled).startswith(" greeting<|im_end|>")


# -- (b) one federated round with DP, (c) plain PEFT reload ----------------------------------


@pytest.mark.parametrize(("model_type", "task"), ALL_CASES, ids=ALL_IDS)
def test_one_dp_round_and_the_adapter_reloads_in_plain_peft(
    model_type: str,
    task: str,
    tiny_models: dict[str, Path],
    tmp_path: Path,
    documented_loader,
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from fedslm.inprocess import build_site, to_report
    from fedslm.job import make_coordinator, prepare_job

    base = tiny_models[model_type]
    task, options = _task(task)
    pooling = options.pooling if options is not None else "mean"
    job = JobConfig.model_validate(
        {
            "model": {"path": str(base), "pooling": pooling},
            "task": {"type": task},
            "lora": {"r": 2, "alpha": 4},
            # LoRA in every family (the DP default for classification is the probe alone)
            "train": {
                "mode": "lora",
                "local_steps": 2,
                "batch_size": 6,
                "max_length": 16,
                "learning_rate": 0.05,
            },
            "privacy": {"noise_multiplier": 1.0, "max_grad_norm": 1.0},
            "federation": {"sites": 2, "rounds": 1},
            "data": {"synthetic": {"rows_per_site": 16}},
            # a test budget: the policy must not refuse a tiny, noisy site
            "policy": {
                "default": {
                    "privacy": {"lifetime_epsilon": 1e4, "max_epsilon_per_job": 1e4},
                    "min_train_records": 1,
                }
            },
        }
    )
    prepared = prepare_job(job, "test", tmp_path / "run")
    sites = [build_site(prepared, s) for s in prepared.sites]
    coordinator = make_coordinator(prepared)
    initial = {k: v.clone() for k, v in coordinator.state.items()}
    coordinator.start_round(1)
    updates = [site.train_round(1, coordinator.state) for site in sites]
    assert all(u.segment is not None and u.epsilon is not None for u in updates)  # DP was on
    new = coordinator.aggregate(
        1, [to_report(s, u) for s, u in zip(sites, updates, strict=True)], []
    )
    assert new is not None
    # the default aggregation (ffa) keeps every A factor at its shared initialisation
    moved = {k for k in initial if not torch.equal(initial[k], new[k])}
    assert moved == {k for k in initial if ".lora_A." not in k}
    coordinator.finish()

    # (c) a stranger loads base + adapter with transformers and PEFT only
    adapter = tmp_path / "run" / "adapter"
    meta = json.loads((adapter / "fedslm_adapter.json").read_text())
    if task == "classification" and meta["pooling"] == "mean":
        # the loading code docs/models.md gives a stranger, executed from the doc
        plain = documented_loader(base, adapter)
    elif task == "classification":
        plain = AutoModelForSequenceClassification.from_pretrained(
            base,
            num_labels=meta["num_labels"],
            id2label={int(k): v for k, v in meta["id2label"].items()},
        )
        plain.config.pad_token_id = meta["pad_token_id"]  # decoders without a pad token
    else:
        plain = AutoModelForCausalLM.from_pretrained(base)
    if not isinstance(plain, PeftModel):
        plain = PeftModel.from_pretrained(plain, adapter).eval()
    ours = coordinator.outputs.model.eval()  # the model the adapter was exported from
    batch = collate(sites[0].eval_data, list(range(min(4, len(sites[0].eval_data)))), CPU)
    batch.pop("labels")
    with torch.no_grad():
        theirs = plain(**batch)
        theirs = theirs if isinstance(theirs, torch.Tensor) else theirs.logits
        torch.testing.assert_close(theirs, ours(**batch).logits)


# -- (d) per-sample gradients ----------------------------------------------------------------


def _example_norms(model: torch.nn.Module, data: Encoded) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    for i in range(len(data)):
        batch = collate(data, [i], CPU)
        labels = batch.pop("labels")
        grads = torch.autograd.grad(per_example_loss(model(**batch).logits, labels).sum(), params)
        norms.append(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
    return torch.stack(norms)


@pytest.mark.parametrize(("model_type", "task"), ALL_CASES, ids=ALL_IDS)
def test_clipped_per_sample_gradients_equal_one_at_a_time_clipping(
    model_type: str, task: str, tiny_models: dict[str, Path]
) -> None:
    task, options = _task(task)
    model, data = _prepare(tiny_models[model_type], task, options)
    model.train()
    # a bound between the two middle norms: half the examples are clipped, half are not, and
    # none sits exactly at the bound (where Opacus' and the reference's rounding could differ)
    norms = _example_norms(model, data).sort().values
    mid = len(norms) // 2
    clip = float((norms[mid - 1] + norms[mid]) / 2)
    reference = _reference(model, data, clip, len(data))

    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    gsm = per_sample_module(model)
    optimizer = dp_optimizer(torch.optim.SGD(params, lr=1.0), 0.0, clip, len(data), None)
    gsm.train()
    batch = collate(data, list(range(len(data))), CPU)
    labels = batch.pop("labels")
    optimizer.zero_grad()
    per_example_loss(gsm(**batch).logits, labels).mean().backward()
    optimizer.step()
    gsm._close()
    # float32 sums taken in another order: rounding errors scale with the update's largest
    # entry (some tiny random layers get gradients near 1e-10, where only that scale means much)
    scale = max(float(r.abs().max()) for r in reference)
    worst = max(
        float((old - p.detach() - ref).abs().max())
        for p, old, ref in zip(params, before, reference, strict=True)
    )
    assert worst <= 1e-5 * scale  # measured: at most 4e-6 of the scale, over all families
    for p, old, ref in zip(params, before, reference, strict=True):
        torch.testing.assert_close(old - p.detach(), ref, rtol=1e-4, atol=1e-5 * scale)


def test_bf16_checkpoints_train_their_head_and_adapter_in_fp32(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """Most real decoders ship bf16 and transformers 5 loads them so; PEFT's copy of the head
    would train in bf16. Everything trainable must be fp32, per-sample gradients included."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "qwen2-bf16"
    shutil.copytree(tiny_models["qwen2"], folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"]).to(torch.bfloat16).save_pretrained(
        folder
    )
    loaded = load_model(
        folder, "classification", LoraConfig(r=4), LABELS, CPU, seed=0, options=FAMILY_HEAD
    )
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params)
    assert loaded.model.base_model.model.model.embed_tokens.weight.dtype == torch.bfloat16
    gsm = per_sample_module(loaded.model)
    gsm.train()
    optimizer = dp_optimizer(torch.optim.SGD(params, lr=0.1), 1.0, 1.0, 4, None)
    batch = collate(_texts(loaded, "classification"), [0, 1, 2, 3], CPU)
    labels = batch.pop("labels")
    per_example_loss(gsm(**batch).logits, labels).mean().backward()
    assert all(p.grad_sample.dtype == torch.float32 for p in params)
    optimizer.step()
    gsm._close()


# -- errors and overrides --------------------------------------------------------------------


def _unknown_family_folder(tmp_path: Path, tiny_models: dict[str, Path]) -> Path:
    """A tiny Qwen3 (a real transformers architecture fedslm has no table entry for)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    folder = tmp_path / "qwen3"
    shutil.copytree(tiny_models["qwen2"], folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    old = json.loads((folder / "config.json").read_text())
    config = Qwen3Config(
        vocab_size=old["vocab_size"],
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=64,
        pad_token_id=old["pad_token_id"],
    )
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(folder)
    return folder


def test_unknown_family_names_itself_and_the_keys_to_set(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    folder = _unknown_family_folder(tmp_path, tiny_models)
    with pytest.raises(ModelError) as err:
        load_model(folder, "causal-lm", LoraConfig(), [], CPU, seed=0)
    msg = str(err.value)
    for needle in (
        "'qwen3'",
        "lora.target_modules",
        "model.prompt_template",
        "model.pad_token",
        "model.head_modules",
        "docs/models.md",
    ):
        assert needle in msg
    # with its targets given, an unknown family trains on generic defaults
    loaded = load_model(
        folder, "causal-lm", LoraConfig(target_modules=["q_proj", "v_proj"]), [], CPU, seed=0
    )
    assert loaded.defaults is not None and not loaded.defaults.known
    assert loaded.prompt_template == PromptTemplate("chat")


def test_encoders_are_refused_as_causal_lms(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(ModelError, match=r"encoder.*classification"):
        load_model(tiny_models["distilbert"], "causal-lm", LoraConfig(), [], CPU, seed=0)


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning")
def test_trainable_embeddings_are_refused_not_silently_handled(
    tiny_models: dict[str, Path],
) -> None:
    with pytest.raises(ModelError, match=r"Opacus.*lora\.target_modules"):
        load_model(
            tiny_models["llama"],
            "causal-lm",
            LoraConfig(target_modules=["embed_tokens"]),
            [],
            CPU,
            seed=0,
        )


def test_random_weights_that_would_not_be_saved_are_refused(
    tiny_models: dict[str, Path],
) -> None:
    loaded = load_model(tiny_models["llama"], "causal-lm", LoraConfig(), [], CPU, seed=0)
    check_new_weights_saved(loaded.model, set(), "x")  # nothing new: fine
    with pytest.raises(ModelError, match=r"model\.head_modules"):
        check_new_weights_saved(loaded.model, {"lm_head.weight"}, "x")


def test_overrides_pad_token_and_prompt_template(tiny_models: dict[str, Path]) -> None:
    gpt2 = tiny_models["gpt2"]
    opts = ModelConfig(path=str(gpt2), pad_token="<unk>", prompt_template="Q: {prompt}\nA:")
    loaded = load_model(gpt2, "causal-lm", LoraConfig(), [], CPU, seed=0, options=opts)
    assert loaded.tokenizer.pad_token == "<unk>"
    assert loaded.prompt_template == PromptTemplate("plain", "Q: {prompt}\nA:")
    # an eos fallback when nothing is set (GPT-2 ships no pad token)
    default = load_model(gpt2, "causal-lm", LoraConfig(), [], CPU, seed=0)
    assert default.tokenizer.pad_token == default.tokenizer.eos_token
    with pytest.raises(ModelError, match="not in the tokenizer's vocabulary"):
        load_model(
            gpt2,
            "causal-lm",
            LoraConfig(),
            [],
            CPU,
            seed=0,
            options=ModelConfig(path=str(gpt2), pad_token="<|pad|>"),
        )
    with pytest.raises(ModelError, match="ships no chat template"):
        load_model(
            gpt2,
            "causal-lm",
            LoraConfig(),
            [],
            CPU,
            seed=0,
            options=ModelConfig(path=str(gpt2), prompt_template="chat"),
        )
    # GPT-2's Conv1D layers are recognised in an overridden target list too
    more = load_model(
        gpt2, "causal-lm", LoraConfig(target_modules=["c_attn", "c_proj"]), [], CPU, seed=0
    )
    assert more.defaults is not None and more.defaults.fan_in_fan_out
    assert more.model.peft_config["default"].fan_in_fan_out
    # a checkpoint's chat template can be replaced by a plain one
    qwen = tiny_models["qwen2"]
    plain = load_model(
        qwen,
        "causal-lm",
        LoraConfig(),
        [],
        CPU,
        seed=0,
        options=ModelConfig(path=str(qwen), prompt_template="{prompt}"),
    )
    assert plain.prompt_template == PromptTemplate("plain", "{prompt}")


def test_prompt_template_needs_one_placeholder() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="exactly once"):
        ModelConfig(prompt_template="no placeholder")
    assert ModelConfig(prompt_template="chat").prompt_template == "chat"


# -- memory estimate -------------------------------------------------------------------------


def test_memory_estimate_components() -> None:
    arch = REFERENCE_MODELS[2]  # Llama-3.2-1B
    assert lora_params(arch, 8) == 16 * 8 * (2048 * 3 + 512)  # 851,968: PEFT prints the same
    one, eight = estimate_site_memory(arch, 1), estimate_site_memory(arch, 8)
    assert eight.per_sample_grads == 8 * one.per_sample_grads == 8 * 4 * lora_params(arch)
    assert eight.weights == one.weights == arch.params * 2
    assert estimate_site_memory(arch, 8, dp=False).per_sample_grads == 0
    assert estimate_site_memory(arch, 8, causal_lm=False).logits == 0
    assert estimate_site_memory(arch, 8, weight_bytes=4).total > eight.total
