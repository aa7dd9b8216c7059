"""The job config: one typed schema, YAML in, validated objects out.

Defaults are written here and nowhere else. ``load_config`` turns every validation problem into a
``ConfigError`` that names the file and the dotted key, and suggests the nearest valid key for a
typo, so a site operator can fix a config without reading code.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedslm.aggregation_rules import (
    AGGREGATION_RULES,
    AggregationRule,
    quoted,
    rule_for,
    rules_where,
)
from fedslm.errors import ConfigError

PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    """Which base model to fine-tune. ``path`` (a local folder) wins over ``name``."""

    name: str | None = Field(
        default="minilm",
        description="A packaged model: 'minilm' (pretrained, from PyPI), 'gemma3-270m' "
        "(pretrained Gemma 3 270M, the optional extra fedslm[gemma]; built once on first use), "
        "or a small random "
        "model built offline for tests and smoke runs: 'tiny-bert', 'tiny-llama', or "
        "'tiny-<model_type>' for any family in docs/models.md (e.g. 'tiny-qwen2').",
    )
    path: str | None = Field(default=None, description="A local Hugging Face model folder.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # The three keys below override the model family's defaults (fedslm/models/families.py);
    # None means "the family default".
    prompt_template: str | None = Field(
        default=None,
        description="Causal-LM only: how a prompt/response pair is laid out. 'chat': the "
        "checkpoint's own chat template; any other text is a plain template with one "
        "'{prompt}' placeholder ('{prompt}' alone: the prompt as written). Default: the chat "
        "template when the checkpoint ships one, else the family's plain template.",
    )
    pad_token: str | None = Field(
        default=None,
        description="Token to pad with; it must already be in the vocabulary (embeddings "
        "stay frozen). Default: the tokenizer's own pad token, else its eos token.",
    )
    head_modules: list[str] | None = Field(
        default=None,
        description="Classification only: the modules of the task head, trained in full and "
        "saved with the adapter. Default: the head of the pooling in use (['classifier'] "
        "with mean pooling, the family's head with pooling 'model').",
    )
    pooling: Literal["mean", "model"] = Field(
        default="mean",
        description="Classification only. mean: the masked mean of the last hidden states, "
        "L2-normalised, then a linear 'classifier' with logits scaled by logit_scale (how "
        "sentence-embedding models such as all-MiniLM-L6-v2 were trained; frozen, it is a "
        "strong feature for a DP linear probe); model: the family's own Hugging Face head "
        "(e.g. BERT's pooler + classifier), which plain transformers reloads without fedslm.",
    )
    logit_scale: PositiveFloat = Field(
        default=10.0,
        description="Mean pooling: logits are this multiple of the classifier's output on the "
        "unit-length feature (a cosine classifier with temperature 1/logit_scale).",
    )
    head_init: Literal["auto", "label-names", "zero", "random"] = Field(
        default="auto",
        description="Classification: how the new head starts. auto: label-names with mean "
        "pooling, random with pooling 'model'. label-names: each class's row "
        "is the base model's (mean-pooled, unit-length) encoding of its label name, so the "
        "model starts as a zero-shot classifier; the label set is part of the job, so this "
        "costs no privacy (needs pooling 'mean'). zero: all zeros. random: the model "
        "library's random initialisation from the job seed.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if self.path is None and self.name is None:
            raise ValueError("set model.name (a packaged model) or model.path (a local folder)")
        t = self.prompt_template
        if t is not None and t != "chat" and t.count("{prompt}") != 1:
            raise ValueError(
                "model.prompt_template must be 'chat' or contain '{prompt}' exactly once, "
                f"got {t!r}"
            )
        if self.head_modules is not None and not self.head_modules:
            raise ValueError("model.head_modules is empty; leave it out for the family default")
        if self.head_init == "label-names" and self.pooling != "mean":
            raise ValueError(
                "model.head_init 'label-names' encodes the label names with mean pooling; set "
                "model.pooling to 'mean', or model.head_init to 'zero' or 'random'"
            )
        return self

    @property
    def resolved_head_init(self) -> Literal["label-names", "zero", "random"]:
        """What ``head_init: auto`` stands for with this pooling."""
        if self.head_init != "auto":
            return self.head_init
        return "label-names" if self.pooling == "mean" else "random"


LABEL_PROMPT = (
    "{text}\n\nWhich of these labels fits the text above: {labels}? Answer with the label only."
)


class TaskConfig(_Section):
    """What the model learns: labels from text, or responses from prompts."""

    type: Literal["classification", "causal-lm"] = "classification"
    classifier: Literal["head", "label-words"] = Field(
        default="head",
        description="Classification only. head: a classification head on the model (the "
        "family's, or mean pooling). label-words: a generative model is asked "
        "task.label_prompt and answers with the label's name; trained as instruction tuning, "
        "a text's class is the label whose name the model scores highest (fedslm/labelwords.py).",
    )
    label_prompt: str = Field(
        default=LABEL_PROMPT,
        description="label-words: the question, with '{text}' (the row's text, cut at its end "
        "to fit train.max_length) once and optionally '{labels}' (the label names, "
        "comma-separated), laid out by the model's prompt template.",
    )

    @model_validator(mode="after")
    def _label_words(self) -> TaskConfig:
        if self.classifier == "label-words" and self.type != "classification":
            raise ValueError(
                "task.classifier 'label-words' classifies texts; set task.type to "
                "'classification' (a causal-lm job already trains on prompt/response pairs)"
            )
        if self.label_prompt != LABEL_PROMPT:
            if self.classifier != "label-words":
                raise ValueError(
                    "task.label_prompt is the question of task.classifier 'label-words'; set "
                    "task.classifier: label-words, or remove task.label_prompt"
                )
            p = self.label_prompt
            if p.count("{text}") != 1 or p.count("{labels}") > 1:
                raise ValueError(
                    "task.label_prompt must contain '{text}' exactly once and '{labels}' at "
                    f"most once, got {p!r}"
                )
        return self

    @property
    def label_words(self) -> bool:
        """Whether texts are classified by a generative model writing the label."""
        return self.classifier == "label-words"

    @property
    def model_task(self) -> Literal["classification", "causal-lm"]:
        """How the model is built: a label-words classifier is a causal LM."""
        return "causal-lm" if self.label_words else self.type


class LoraConfig(_Section):
    """LoRA adapter shape. ``target_modules`` defaults to the model family's attention layers."""

    r: PositiveInt = 8
    alpha: PositiveFloat = 16.0
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    target_modules: list[str] | None = None


class ProbeConfig(_Section):
    """The linear probe: the head alone, trained on features the frozen base model computes
    once per site (``train.mode`` head, and the first rounds of lp-lora). SGD with momentum
    on unit-length features, the DP linear-probe recipe (Tramer & Boneh 2021); chosen on the
    public benchmark data sets (docs/benchmarks.md, section 3)."""

    local_epochs: PositiveFloat = Field(
        default=3.0,
        description="Passes per round; with the probe's 10 default rounds, 30 in the job.",
    )
    batch_size: PositiveInt | None = Field(
        default=None,
        description="Expected (Poisson) batch; q = min(1, batch_size / records). Default: 512 "
        "with DP (the noise per step is fixed, so a larger batch carries more signal), 128 "
        "without (more steps, less drift between label-skewed sites).",
    )
    learning_rate: PositiveFloat = 2.0
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    rounds: PositiveInt = Field(
        default=1,
        description="lp-lora: how many of the job's first rounds train the probe before LoRA "
        "and head train together.",
    )
    epsilon_share: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(
        default=0.3,
        description="lp-lora under DP with a target epsilon: the probe rounds alone are "
        "calibrated to this share of privacy.target_epsilon; the LoRA rounds get the noise "
        "that brings the composition of both phases to the target.",
    )

    def logical_batch(self, dp: bool) -> int:
        """The expected batch of a probe step (``batch_size``, or its default)."""
        if self.batch_size is not None:
            return self.batch_size
        return 512 if dp else 128


TrainMode = Literal["lora", "head", "lp-lora"]

# federation.rounds when the job trains the probe alone (FederationConfig.rounds says why)
PROBE_ROUNDS = 10


class TrainConfig(_Section):
    """Local training at each site. Set ``local_epochs`` or ``local_steps`` (per round).

    The learning-rate schedule runs over the whole job: warm-up and decay span every round's
    local steps (each phase of lp-lora has its own), so round 2 continues where round 1
    stopped instead of restarting at the peak.
    """

    mode: Literal["auto", "lora", "head", "lp-lora"] = Field(
        default="auto",
        description="lora: LoRA factors and head; head: a linear probe on frozen features "
        "(classification); lp-lora: probe first (train.probe.rounds), then LoRA and head. "
        "auto: head for classification with mean pooling, lora otherwise.",
    )
    local_epochs: PositiveFloat | None = 1.0
    local_steps: PositiveInt | None = None
    batch_size: PositiveInt | None = Field(
        default=None,
        description="Expected logical batch of a LoRA step (Poisson-sampled under DP): one "
        "clip-and-noise per logical batch. Default 512 under DP (noise does not grow with the "
        "batch, signal does), 32 without.",
    )
    physical_batch_size: PositiveInt = Field(
        default=32,
        description="Rows per forward/backward pass; a logical batch is processed in "
        "micro-batches of this size, so memory does not grow with batch_size.",
    )
    learning_rate: PositiveFloat | None = Field(
        default=None,
        description="Peak LoRA learning rate. Default: 5e-3 without DP (measured on the public "
        "data sets, docs/benchmarks.md section 3a), 5e-4 with DP (the literature's; DP LoRA did "
        "not learn on the benchmark's sites at any rate tried).",
    )
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    optimizer: Literal["adamw", "sgd"] = "adamw"
    schedule: Literal["linear", "cosine", "constant"] = Field(
        default="linear",
        description="Learning rate after warm-up, over the whole job's steps: linear or cosine "
        "decay to 0, or constant.",
    )
    warmup_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        default=0.1, description="Share of the job's LoRA steps spent warming up linearly."
    )
    max_length: Annotated[int, Field(ge=8)] = 64
    eval_batch_size: PositiveInt = 64
    proximal_mu: PositiveFloat | None = Field(
        default=None,
        description="FedProx (Li et al. 2020): after each LoRA step, a step of its own pulls "
        "the trained weights toward the round's global adapter, w -= lr * mu * (w - w_global), "
        "with this mu (0.01 is a common start). It uses no data, so under DP it costs no "
        "privacy. Works with every server optimizer. null: off.",
    )
    probe: ProbeConfig = ProbeConfig()

    @model_validator(mode="after")
    def _epochs_or_steps(self) -> TrainConfig:
        if self.local_steps is not None:
            if "local_epochs" in self.model_fields_set and self.local_epochs is not None:
                raise ValueError("set train.local_epochs or train.local_steps, not both")
            # written out as null, so a saved config validates again to the same thing
            object.__setattr__(self, "local_epochs", None)
        elif self.local_epochs is None:
            raise ValueError("set train.local_epochs or train.local_steps")
        return self

    def logical_batch(self, dp: bool) -> int:
        """The expected batch of a LoRA step (``batch_size``, or its default)."""
        if self.batch_size is not None:
            return self.batch_size
        return 512 if dp else 32

    def peak_lr(self, dp: bool) -> float:
        """The peak learning rate of LoRA steps (``learning_rate``, or its default)."""
        if self.learning_rate is not None:
            return self.learning_rate
        return 5e-4 if dp else 5e-3

    def steps_per_round(self, sample_rate: float) -> int:
        """Local optimizer steps per round: explicit steps, or epochs of ``1/q`` steps each."""
        if self.local_steps is not None:
            return self.local_steps
        assert self.local_epochs is not None
        return max(1, round(self.local_epochs / sample_rate))


class CentralDPConfig(_Section):
    """Site-level DP on the adapter the coordinator releases (``fedslm.privacy.central``):
    each site's update is clipped to ``clip_norm`` and Gaussian noise is added to the sum.
    Off by default; record-level DP-SGD at the sites is the primary guarantee."""

    enabled: bool = False
    clip_norm: PositiveFloat | None = Field(
        default=None,
        description="L2 bound on one site's whole update per round (required when enabled).",
    )
    target_epsilon: PositiveFloat | None = Field(
        default=None, description="Site-level epsilon for the whole job; noise is calibrated."
    )
    noise_multiplier: PositiveFloat | None = Field(
        default=None, description="Noise std as a multiple of clip_norm, instead of a target."
    )
    delta: Annotated[float, Field(gt=0.0, lt=1.0)] = 1e-5
    weighting: Literal["uniform", "records"] = Field(
        default="uniform",
        description="uniform: each site counts once; records: weight min(records, "
        "records_cap) / records_cap. The mean always divides by the number of sites.",
    )
    records_cap: PositiveInt | None = Field(
        default=None, description="Records at which a site reaches full weight ('records')."
    )

    @model_validator(mode="after")
    def _complete(self) -> CentralDPConfig:
        if not self.enabled:
            return self
        if self.clip_norm is None:
            raise ValueError(
                "central DP is on: set privacy.central.clip_norm (the L2 bound on one site's "
                "update; the norms of a non-DP run's updates are a guide)"
            )
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError(
                "central DP is on: set exactly one of privacy.central.target_epsilon and "
                "privacy.central.noise_multiplier"
            )
        if self.weighting == "records" and self.records_cap is None:
            raise ValueError(
                "privacy.central.weighting 'records' needs privacy.central.records_cap"
            )
        return self


class PrivacyConfig(_Section):
    """Record-level DP-SGD at every site. On by default; turning it off is for baselines.
    ``central`` adds optional site-level DP at the coordinator on top."""

    enabled: bool = True
    target_epsilon: PositiveFloat | None = Field(
        default=8.0, description="Epsilon for the whole job; the noise is calibrated to it."
    )
    delta: Annotated[float, Field(gt=0.0, lt=1.0)] = 1e-5
    noise_multiplier: Annotated[float, Field(ge=0.0)] | None = Field(
        default=None, description="Fixed noise multiplier instead of a target epsilon."
    )
    max_grad_norm: PositiveFloat = 1.0
    accountant: Literal["prv", "rdp", "pld"] = "prv"
    central: CentralDPConfig = CentralDPConfig()

    @model_validator(mode="after")
    def _epsilon_or_sigma(self) -> PrivacyConfig:
        if self.noise_multiplier is not None:
            if "target_epsilon" in self.model_fields_set and self.target_epsilon is not None:
                raise ValueError("set privacy.target_epsilon or privacy.noise_multiplier, not both")
            object.__setattr__(self, "target_epsilon", None)
        elif self.enabled and self.target_epsilon is None:
            raise ValueError("DP is on: set privacy.target_epsilon or privacy.noise_multiplier")
        return self


class ServerOptimizerConfig(_Section):
    """What the coordinator does with the aggregated update (``fedslm.server_opt``; Reddi et
    al. 2021): the pseudo-gradient ``aggregated - global`` is a gradient step of server SGD,
    SGD with momentum, Adam or Yogi. ``sgd`` with learning rate 1 (the default) takes the
    aggregate as the new global adapter: plain FedAvg. FedProx is not a server optimizer: it
    runs at the sites (``train.proximal_mu``)."""

    name: Literal["sgd", "sgdm", "adam", "yogi"] = "sgd"
    learning_rate: PositiveFloat | None = Field(
        default=None,
        description="Server learning rate; default 1.0 (sgd, sgdm), 0.1 (adam), 0.01 (yogi), "
        "as in Flower.",
    )
    # None: the optimizer's default (as Flower's). Set only what applies to the chosen one.
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] | None = Field(
        default=None, description="sgdm (default 0.9)"
    )
    beta1: Annotated[float, Field(ge=0.0, lt=1.0)] | None = Field(
        default=None, description="adam/yogi (default 0.9)"
    )
    beta2: Annotated[float, Field(ge=0.0, lt=1.0)] | None = Field(
        default=None, description="adam/yogi (default 0.99)"
    )
    tau: PositiveFloat | None = Field(
        default=None, description="adam/yogi: adaptivity (default 1e-3)"
    )

    @model_validator(mode="after")
    def _only_what_applies(self) -> ServerOptimizerConfig:
        applies = {
            "momentum": {"sgdm"},
            "beta1": {"adam", "yogi"},
            "beta2": {"adam", "yogi"},
            "tau": {"adam", "yogi"},
        }
        for key, names in applies.items():
            if getattr(self, key) is not None and self.name not in names:
                raise ValueError(
                    f"federation.server_optimizer.{key} applies to {' and '.join(sorted(names))}"
                    f", not to {self.name}"
                )
        return self

    def hyperparameters(self) -> dict[str, float]:
        """Keyword arguments for ``fedslm.server_opt.make_server_optimizer``."""
        lr = self.learning_rate
        if self.name == "sgd":
            return {"lr": lr or 1.0}
        if self.name == "sgdm":
            return {"lr": lr or 1.0, "momentum": 0.9 if self.momentum is None else self.momentum}
        return {
            "eta": lr or (0.1 if self.name == "adam" else 0.01),
            "beta1": 0.9 if self.beta1 is None else self.beta1,
            "beta2": 0.99 if self.beta2 is None else self.beta2,
            "tau": 1e-3 if self.tau is None else self.tau,
        }


class RobustConfig(_Section):
    """Defences against bad updates. Every update is always screened (names, shapes, finite
    values); these add an outlier test, norm bounding and robust averaging rules."""

    rule: Literal["mean", "median", "trimmed-mean"] = Field(
        default="mean",
        description="mean: weighted by records; median / trimmed-mean: coordinate-wise, "
        "unweighted.",
    )
    trim_fraction: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.1
    outlier_factor: PositiveFloat | None = Field(
        default=10.0,
        description="Reject an update whose norm exceeds this multiple of the median norm of "
        "the others (with 3 or more updates); null turns the test off.",
    )
    max_update_norm: PositiveFloat | None = Field(
        default=None, description="Clip each site's update (adapter minus global) to this norm."
    )


class SecAggConfig(_Section):
    """Parameters of secure aggregation (``federation.secure_aggregation``)."""

    clip_range: PositiveFloat = Field(
        default=1.0,
        description="Each coordinate of a site's update (adapter minus global) is clipped to "
        "[-clip_range, clip_range] before quantisation.",
    )
    bits: Annotated[int, Field(ge=2, le=53)] = Field(
        default=24,
        description="Quantisation bits per coordinate: step = clip_range / (2**(bits-1) - 1).",
    )
    threshold: Annotated[int, Field(ge=2)] | None = Field(
        default=None,
        description="Fewest sites that must survive every protocol stage (default: a majority).",
    )
    max_weight: PositiveInt = Field(
        default=2**20,
        description="Largest weight one site puts into the sum: its training records (a site "
        "with more cannot take part). It sizes the ring: 32-bit, half the masked upload, when "
        "sites * max_weight * (2**(bits-1) - 1) < 2**31, else 64-bit.",
    )


class FederationConfig(_Section):
    """Who takes part and how rounds are run."""

    sites: PositiveInt | list[str] = Field(
        default=3, description="A number of simulated sites, or their names."
    )
    rounds: PositiveInt = Field(
        default=5,
        description="Rounds of the job. Default: 10 when the job trains the probe alone "
        "(train mode head: averaging the sites' heads twice as often as in 5 rounds of twice "
        "the epochs cuts the drift between label-skewed sites at the same noise, "
        "docs/benchmarks.md section 3b), 5 otherwise (LoRA's rounds cost minutes each).",
    )
    min_sites: PositiveInt | None = Field(
        default=None, description="Fewest successful replies to aggregate a round (default: all)."
    )
    aggregation: Literal["fedavg-factors", "ffa", "exact"] = Field(
        default="ffa",
        description="fedavg-factors: average A and B separately (the common baseline, not "
        "exact); ffa: A frozen at the shared initialisation, B averaged (exact, linear); "
        "exact: average the products B·A and refactor to lora.r by SVD (exact up to rank).",
    )
    site_ranks: dict[str, PositiveInt] = Field(
        default_factory=dict,
        description="exact only: LoRA rank of named sites (others use lora.r); a site's "
        "policy may cap it further.",
    )
    server_optimizer: ServerOptimizerConfig = ServerOptimizerConfig()
    robust: RobustConfig = RobustConfig()
    round_timeout_s: PositiveFloat = Field(
        default=3600.0,
        description="How long the coordinator waits for the sites' replies to one message "
        "(training, evaluation, each secure-aggregation stage); a site that has not replied "
        "by then counts as failed for the round.",
    )
    round_retries: Annotated[int, Field(ge=0)] = Field(
        default=2,
        description="How many times a round that could not be aggregated because sites "
        "failed (errors, timeouts) is sent again before the run fails. A site that already "
        "trained the round replays its release, so a retry spends nothing twice. Not used "
        "with secure aggregation, where a second sum over a different set of sites could "
        "reveal one site's update.",
    )
    connect_timeout_s: PositiveFloat = Field(
        default=300.0,
        description="Before round 1 the coordinator waits this long for every site to "
        "connect, then starts with those connected if at least min_sites are.",
    )
    secure_aggregation: bool = Field(
        default=False,
        description="Mask the sites' updates so that the coordinator learns only their "
        "weighted sum (fedslm.secagg); needs ffa or fedavg-factors.",
    )
    secagg: SecAggConfig = SecAggConfig()

    @model_validator(mode="after")
    def _check_sites(self) -> FederationConfig:
        names = self.site_names
        if len(set(names)) != len(names):
            raise ValueError("federation.sites has duplicate names")
        for name in names:
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"federation.sites: {name!r} is not a usable site name")
        if self.min_sites is not None and self.min_sites > len(names):
            raise ValueError(
                f"federation.min_sites={self.min_sites} is more than the {len(names)} sites"
            )
        unknown = sorted(set(self.site_ranks) - set(names))
        if unknown:
            raise ValueError(f"federation.site_ranks names unknown sites {unknown}")
        self._rule_allows()
        if self.secure_aggregation:
            self._secure_aggregation_fits()
        return self

    def _rule_allows(self) -> None:
        # what the aggregation rule declares it allows (fedslm.aggregation_rules)
        rule, agg = self.rule, self.aggregation
        if self.site_ranks and not rule.per_site_ranks:
            ranked = quoted(rules_where("per_site_ranks"))
            raise ValueError(
                f"federation.site_ranks needs aggregation {ranked}: aggregation '{agg}' "
                f"{rule.summary}, so every site trains at lora.r; remove federation.site_ranks "
                f"or set federation.aggregation to {ranked}"
            )
        name = self.server_optimizer.name
        if not rule.allows_server_optimizer(name):
            allowed = " or ".join(sorted(rule.server_optimizers or ()))
            others = [n for n in AGGREGATION_RULES if rule_for(n).allows_server_optimizer(name)]
            raise ValueError(
                f"federation.server_optimizer {name!r} keeps state on the LoRA factors, and "
                f"aggregation '{agg}' {rule.summary} every round; use {allowed} with {agg}, or "
                f"aggregation {quoted(others)}"
            )
        robust = self.robust.rule != "mean" or self.robust.max_update_norm is not None
        if robust and not rule.coordinatewise_robust:
            raise ValueError(
                "federation.robust.rule median/trimmed-mean and max_update_norm act on "
                "factors coordinate by coordinate; they work with aggregation "
                f"{quoted(rules_where('coordinatewise_robust'))}, not with {agg}"
            )

    @property
    def rule(self) -> AggregationRule:
        """The rule object of ``aggregation`` (``fedslm.aggregation_rules``)."""
        return rule_for(self.aggregation)

    def _secure_aggregation_fits(self) -> None:
        # The coordinator sees only the masked sum, so only linear rules over the sum can work.
        n = len(self.site_names)
        if not self.rule.linear:
            raise ValueError(
                "federation.secure_aggregation needs a linear aggregation: the coordinator "
                f"learns only the sum of the updates, and '{self.aggregation}' "
                f"{self.rule.summary}; use federation.aggregation {quoted(rules_where('linear'))}"
            )
        if self.robust.rule != "mean" or self.robust.max_update_norm is not None:
            raise ValueError(
                "federation.secure_aggregation: the coordinator cannot see single updates, so "
                "federation.robust.rule median/trimmed-mean and max_update_norm cannot be "
                "applied; leave federation.robust at its defaults (rule 'mean', no "
                "max_update_norm)"
            )
        if n < 2:
            raise ValueError(
                f"federation.secure_aggregation needs at least 2 sites, got {n}: with one site "
                "the sum is that site's update"
            )
        t = self.secagg.threshold
        if t is not None and t > n:
            raise ValueError(
                f"federation.secagg.threshold={t} is more than the {n} sites; it must be in "
                f"[2, {n}]"
            )
        s = self.secagg
        largest = n * s.max_weight * (2 ** (s.bits - 1) - 1)
        if largest >= 2**63:
            raise ValueError(
                f"federation.secagg.max_weight={s.max_weight} and federation.secagg.bits="
                f"{s.bits} with {n} sites: the weighted sum can reach {n} * {s.max_weight} * "
                f"(2**{s.bits - 1} - 1) = {largest:.3g}, which does not fit the 64-bit ring "
                "(it must stay below 2**63); lower federation.secagg.bits or "
                "federation.secagg.max_weight"
            )

    @property
    def site_names(self) -> list[str]:
        """Site names, ``site-1``... when only a number was given."""
        if isinstance(self.sites, int):
            return [f"site-{i + 1}" for i in range(self.sites)]
        return list(self.sites)

    @property
    def required_sites(self) -> int:
        """Replies a round needs before it is aggregated."""
        return self.min_sites if self.min_sites is not None else len(self.site_names)


class SyntheticConfig(_Section):
    """The shipped synthetic data set (bank customer messages by intent, skewed per site)."""

    rows_per_site: Annotated[int, Field(ge=10)] = 400
    skew: PositiveFloat = Field(
        default=1.0, description="Dirichlet alpha of each site's intent mix (smaller = more skew)."
    )


class SplitConfig(_Section):
    """How one data set is split into simulated sites."""

    method: Literal["iid", "dirichlet", "column"] = "dirichlet"
    alpha: PositiveFloat = 0.5
    column: str = "site"


class DataConfig(_Section):
    """Where each site's data comes from. Set exactly one of ``path``, ``sites``, ``synthetic``."""

    path: str | None = Field(default=None, description="One file to split into the sites.")
    sites: dict[str, str] | None = Field(default=None, description="Site name -> its own file.")
    synthetic: SyntheticConfig | None = None
    at_sites: bool = Field(
        default=False,
        description="Deployment: each site reads its own data file, named in its site policy "
        "(`data:`); the job only says how to read it. Needs data.labels for classification.",
    )
    split: SplitConfig = SplitConfig()
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    labels: list[str] | None = Field(
        default=None, description="The closed label set (default: the labels seen in training)."
    )
    eval_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        given = [k for k in ("path", "sites", "synthetic") if getattr(self, k) is not None]
        given += ["at_sites"] if self.at_sites else []
        if len(given) != 1:
            raise ValueError(
                "set exactly one of data.path, data.sites, data.synthetic, data.at_sites"
                + (f" (got {', '.join('data.' + g for g in given)})" if given else "")
            )
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError("data.labels has duplicates")
        return self


class SimulatedPolicies(_Section):
    """Simulation only: the site policy of each simulated site (``fedslm.policy.SitePolicy``
    keys). A real site owns its policy file; a coordinator never sends one."""

    default: dict[str, Any] = Field(default_factory=dict, description="Every site's policy.")
    sites: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-site overrides, merged over the default."
    )


# --------------------------------------------------------------------------------------------
# Earlier forms of the job config. A config file, job.json or job message written by an earlier
# fedslm validates (``upgrade_legacy``: the current spelling, and a FutureWarning naming the old
# key and the new one) and keeps its fingerprint (``legacy_form``, in ``config_fingerprint``),
# and with it its job id, its sites' noise seeds and its stored releases.

# (section, key) of every key added to the job config after fingerprints were first recorded;
# see JobConfig.fingerprint
ADDED_KEYS: tuple[tuple[str, str], ...] = (("task", "classifier"), ("task", "label_prompt"))

# federation.server_optimizer.name was the algorithm's name in Reddi et al. (FedAvg, FedAvgM,
# FedAdam, FedYogi); it is now what the coordinator does with the aggregated update
RENAMED_SERVER_OPTIMIZERS: dict[str, str] = {
    "fedavg": "sgd",
    "fedavgm": "sgdm",
    "fedadam": "adam",
    "fedyogi": "yogi",
}
# name 'fedprox' was sgd at the coordinator plus the proximal step at the sites, with
# federation.server_optimizer.proximal_mu (this when left out); now train.proximal_mu
LEGACY_FEDPROX_MU = 0.01


def upgrade_legacy(raw: Any) -> Any:
    """A job config mapping in the current spelling (a copy when anything changed).

    ``federation.server_optimizer.name`` fedavg/fedavgm/fedadam/fedyogi become sgd/sgdm/adam/
    yogi; ``fedprox`` (with its optional ``proximal_mu``) becomes ``sgd`` with
    ``train.proximal_mu``. Each old spelling warns once (FutureWarning). ``proximal_mu: null``
    under ``server_optimizer`` is how an earlier fedslm wrote out every job; it is dropped.
    Raises ValueError when the old and the new spelling of the proximal strength are both set.
    """
    if not isinstance(raw, Mapping) or not isinstance(raw.get("federation"), Mapping):
        return raw
    fed: Mapping[str, Any] = raw["federation"]
    old = fed.get("server_optimizer")
    if not isinstance(old, Mapping) or not (
        "proximal_mu" in old or old.get("name") in (*RENAMED_SERVER_OPTIMIZERS, "fedprox")
    ):
        return raw
    opt = dict(old)
    name, mu = opt.get("name"), opt.pop("proximal_mu", None)
    key = "federation.server_optimizer"
    train: Any = raw.get("train")
    if isinstance(train, BaseModel):
        train = train.model_dump(exclude_unset=True)
    if name == "fedprox":
        if isinstance(train, Mapping) and train.get("proximal_mu") is not None:
            raise ValueError(
                f"{key}.name 'fedprox' (the old spelling of FedProx) and train.proximal_mu are "
                f"both set; remove {key}.name 'fedprox'"
                + (f" and {key}.proximal_mu" if mu is not None else "")
                + " and keep train.proximal_mu (the server optimizer 'sgd', the default, is "
                "what fedprox ran at the coordinator)"
            )
        if mu is not None and (isinstance(mu, bool) or not isinstance(mu, int | float) or mu <= 0):
            raise ValueError(f"{key}.proximal_mu must be a number > 0, got {mu!r}")
        mu = LEGACY_FEDPROX_MU if mu is None else mu
        opt["name"] = "sgd"
        _warn_renamed(
            f"{key}.name 'fedprox'"
            + ("" if old.get("proximal_mu") is None else f" with {key}.proximal_mu"),
            f"{key}.name 'sgd' (the default) and train.proximal_mu: {mu} (FedProx runs at the "
            "sites)",
        )
        train = {**(train if isinstance(train, Mapping) else {}), "proximal_mu": mu}
        return {**raw, "federation": {**fed, "server_optimizer": opt}, "train": train}
    if mu is not None:
        raise ValueError(
            f"{key}.proximal_mu: FedProx's proximal strength is now train.proximal_mu (the "
            "proximal step runs at the sites, with any server optimizer); move it there"
        )
    if name in RENAMED_SERVER_OPTIMIZERS:
        opt["name"] = RENAMED_SERVER_OPTIMIZERS[name]
        _warn_renamed(f"{key}.name {name!r}", f"{key}.name {opt['name']!r}")
    return {**raw, "federation": {**fed, "server_optimizer": opt}}


def _warn_renamed(old: str, new: str) -> None:
    warnings.warn(
        f"{old} is an old spelling (it still loads); write {new} instead (docs/config.md, "
        "'Renamed keys')",
        FutureWarning,
        stacklevel=2,
    )


def legacy_form(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """``config`` (JSON form, as ``model_dump(mode="json")`` gives it) as the fedslm before the
    server-optimizer rename wrote it, for hashing; ``config`` is not changed.

    Every config that version could express gets exactly its old form (the default job, a
    fedprox job with or without proximal_mu, each optimizer with its settings), so its
    fingerprint is what it was; one that spells ``proximal_mu: 0.01`` out hashes as one that
    left it out, which is the same job. A config it could not express (train.proximal_mu with
    sgdm, adam or yogi) keeps ``train.proximal_mu``, a key no old config has, so it hashes
    apart from all of them. A config already in the old form (job.json of an older run) is
    returned as it is.
    """
    fed, train = config.get("federation"), config.get("train")
    if not isinstance(fed, Mapping) or not isinstance(train, Mapping):
        return config
    opt = fed.get("server_optimizer")
    old_names = {new: old for old, new in RENAMED_SERVER_OPTIMIZERS.items()}
    if not isinstance(opt, Mapping) or opt.get("name") not in old_names:
        return config
    train, opt = dict(train), dict(opt)
    mu = train.pop("proximal_mu", None)
    opt["name"], opt["proximal_mu"] = old_names[opt["name"]], None
    if mu is not None and opt["name"] == "fedavg":
        opt["name"] = "fedprox"
        opt["proximal_mu"] = None if mu == LEGACY_FEDPROX_MU else mu
    elif mu is not None:
        train["proximal_mu"] = mu
    return {**config, "train": train, "federation": {**fed, "server_optimizer": opt}}


class JobConfig(_Section):
    """A whole federated job. This is the single source of truth the CLI, sites and coordinator
    share; ``fingerprint`` identifies it in outputs."""

    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    federation: FederationConfig = FederationConfig()
    data: DataConfig = DataConfig(synthetic=SyntheticConfig())
    policy: SimulatedPolicies = SimulatedPolicies()
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data: Any) -> Any:
        return upgrade_legacy(data)

    @model_validator(mode="after")
    def _cross_checks(self) -> JobConfig:
        unknown = sorted(set(self.policy.sites) - set(self.federation.site_names))
        if unknown:
            raise ValueError(f"policy.sites names unknown sites {unknown}")
        sites = self.data.sites
        if sites is not None and set(sites) != set(self.federation.site_names):
            raise ValueError(
                "data.sites names "
                f"{sorted(sites)} must match federation.sites {self.federation.site_names}"
            )
        self._default_rounds()
        self._central_dp_fits()
        self._label_words_fit()
        self._mode_fits()
        if self.privacy.central.enabled and self.federation.secure_aggregation:
            raise ValueError(
                "privacy.central and federation.secure_aggregation cannot be combined: central "
                "DP clips each site's update at the coordinator, which under secure aggregation "
                "never sees a single update; use record-level DP at the sites (privacy.enabled) "
                "with secure aggregation, or turn secure aggregation off"
            )
        return self

    def _default_rounds(self) -> None:
        if "rounds" in self.federation.model_fields_set:
            return
        if self.train_mode == "head":
            # written into the config (and so its fingerprint) like every other default
            federation = self.federation.model_copy(update={"rounds": PROBE_ROUNDS})
            object.__setattr__(self, "federation", federation)

    def _label_words_fit(self) -> None:
        if not self.task.label_words:
            return
        if self.train.mode not in ("auto", "lora"):
            raise ValueError(
                f"train.mode {self.train.mode!r} trains a classification head, and "
                "task.classifier 'label-words' has none (the model writes the label): set "
                "train.mode to 'lora' (or 'auto')"
            )
        # values, not "was it set": a saved config (defaults written out) validates again
        head_keys = ("head_modules", "pooling", "head_init", "logit_scale")
        defaults = ModelConfig.model_fields
        given = [k for k in head_keys if getattr(self.model, k) != defaults[k].default]
        if given:
            raise ValueError(
                f"model.{given[0]} configures a classification head, which task.classifier "
                "'label-words' does not have; remove it (or use task.classifier 'head')"
            )

    def _mode_fits(self) -> None:
        if self.task.label_words:
            return
        mode = self.train.mode
        if mode in ("auto", "lora"):
            return
        if self.task.type != "classification":
            raise ValueError(
                f"train.mode {mode!r} trains a classification head; a causal-lm job trains "
                "LoRA only: set train.mode to 'lora' (or 'auto')"
            )
        if self.model.pooling != "mean":
            raise ValueError(
                f"train.mode {mode!r} trains a probe on mean-pooled features; set "
                "model.pooling to 'mean' or train.mode to 'lora'"
            )
        if mode == "lp-lora":
            if self.train.probe.rounds >= self.federation.rounds:
                raise ValueError(
                    f"train.probe.rounds={self.train.probe.rounds} leaves no LoRA round of the "
                    f"{self.federation.rounds}; lower it or use train.mode 'head'"
                )
            if self.federation.rule.refactors:
                raise ValueError(
                    f"train.mode 'lp-lora' with aggregation '{self.federation.aggregation}': the "
                    "probe rounds leave every LoRA B factor at 0, and refactoring a zero product "
                    "by SVD would zero A as well, so LoRA could never start; use aggregation "
                    f"{quoted(rules_where('refactors', False))}"
                )

    def _central_dp_fits(self) -> None:
        if not self.privacy.central.enabled:
            return
        f = self.federation
        if not f.rule.linear:
            raise ValueError(
                "privacy.central needs a linear aggregation: use federation.aggregation "
                f"{quoted(rules_where('linear'))} ('{f.aggregation}' {f.rule.summary}, so one "
                "site's clipped update would not bound its effect on the released adapter)"
            )
        if f.robust.rule != "mean":
            raise ValueError(
                "privacy.central adds noise to the sum of clipped updates; it needs "
                "federation.robust.rule 'mean'"
            )

    @property
    def train_mode(self) -> TrainMode:
        """The training mode ``train.mode: auto`` stands for: the linear probe for
        classification with mean pooling, with DP or without (it beat LoRA and lp-lora in
        every comparison on the public benchmark data sets, docs/benchmarks.md section 3),
        LoRA otherwise (causal LMs, the family's own head)."""
        if self.train.mode != "auto":
            return self.train.mode
        probe = (
            self.task.type == "classification"
            and not self.task.label_words
            and self.model.pooling == "mean"
        )
        return "head" if probe else "lora"

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of the validated config (defaults included).

        Keys added after fingerprints were first recorded (``ADDED_KEYS``) count only when
        set to something other than their default: a job that does not use them keeps the
        fingerprint it had, and with it its job id, its sites' noise seeds and its stored
        releases (a retried round replays the same update instead of drawing new noise).
        Renamed keys are hashed in their old spelling (``legacy_form``) for the same reason.
        """
        return config_fingerprint(self.model_dump(mode="json"))


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """``JobConfig.fingerprint`` of a config in its JSON form (``model_dump(mode="json")``, as
    job.json keeps it): what the report's checks recompute, so both sides hash alike."""
    data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in legacy_form(config).items()}
    for section, key in ADDED_KEYS:
        default = type(JobConfig.model_fields[section].default).model_fields[key].default
        if isinstance(data.get(section), dict) and data[section].get(key, default) == default:
            data[section].pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    """Read a YAML job file, apply ``key=value`` overrides, and validate.

    Raises ``ConfigError`` naming the file and the key for unreadable YAML, unknown keys, wrong
    types and impossible values. Relative data and model paths are resolved against the config
    file's folder, so a config can be run from anywhere.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; give the job's YAML config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections, not {type(raw).__name__}"
        )
    set_keys: set[str] = set()
    for item in overrides or []:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value, source=f"{path} (--set {item})")
        set_keys.add(key)
    raw = _resolve_paths(raw, path.parent)
    return validate_config(raw, source=str(path), set_keys=set_keys)


def is_empty_config(path: str | Path) -> bool:
    """Whether the config file at ``path`` sets nothing (empty, or only comments): such a
    file runs the whole default job, which a user who meant another file should hear."""
    try:
        return not yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False


def validate_config(
    raw: dict[str, Any], source: str = "<config>", set_keys: set[str] | None = None
) -> JobConfig:
    """Validate an already-parsed config mapping; errors name ``source`` and the key."""
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source, set_keys or set())) from None


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(
            f"--set {item!r}: expected key=value, for example --set train.batch_size=16"
        )
    key, _, text = item.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: the key is empty")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not valid YAML: {exc}") from None
    return key, value


def _set_dotted(raw: dict[str, Any], key: str, value: Any, source: str) -> None:
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    node[parts[-1]] = value


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make relative file paths relative to the config file, not to the working directory:
    the model and data paths, and the ``ledger`` of ``policy.default`` and ``policy.sites.*``."""

    def fix(value: Any) -> Any:
        if isinstance(value, str) and value and not Path(value).is_absolute():
            return str((base / value).resolve())
        return value

    model = raw.get("model")
    if isinstance(model, dict) and "path" in model:
        model["path"] = fix(model["path"])
    data = raw.get("data")
    if isinstance(data, dict):
        if "path" in data:
            data["path"] = fix(data["path"])
        if isinstance(data.get("sites"), dict):
            data["sites"] = {k: fix(v) for k, v in data["sites"].items()}
    policy = raw.get("policy")
    if isinstance(policy, dict):
        sites = policy.get("sites")
        sections = [policy.get("default"), *(sites.values() if isinstance(sites, dict) else ())]
        for section in sections:
            if isinstance(section, dict) and "ledger" in section:
                section["ledger"] = fix(section["ledger"])
    return raw


# pydantic names the member of a union (``PositiveInt | list[str]``) in an error's location:
# 'int', 'list[str]', 'constrained-int', 'function-after[...]'; they mean nothing to a user
_UNION_TAG = re.compile(
    r"^(int|float|str|bool|constrained-\w+|(list|dict|literal)\[.*\]|function-.*)$"
)


def _format_errors(exc: ValidationError, source: str, set_keys: set[str]) -> str:
    problems: dict[str, list[dict[str, Any]]] = {}
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not _UNION_TAG.match(str(p))]
        problems.setdefault(".".join(loc), []).append(err | {"loc": loc})
    lines = [f"{source}: invalid job config ({len(problems)} problem(s)):"]
    for key, errs in problems.items():
        lines.append(f"  - {_describe_problem(key, errs, set_keys)}")
    return "\n".join(lines)


def _describe_problem(key: str, errs: list[dict[str, Any]], set_keys: set[str]) -> str:
    """One line for every error pydantic gives for one key: a value that fits no member of a
    union gets one error per member; the member whose type matched says what is wrong."""
    key = key or "(top level)"
    err = errs[0]
    if err["type"] == "extra_forbidden":
        msg = f"unknown key '{key}'"
        hint = _suggest(err["loc"])
        if hint:
            msg += f"; did you mean '{hint}'?"
    else:
        # 'Input should be a valid list' is noise when another member took the value's type
        fitting = [e for e in errs if not e["type"].endswith("_type")] or errs
        text = "; or ".join(dict.fromkeys(e["msg"] for e in fitting))
        given = err.get("input")
        shown = "" if isinstance(given, dict) else f" (got {given!r})"
        msg = f"{key}: {text}{shown}"
    if key in set_keys:
        msg += " [from --set]"
    return msg


def _suggest(loc: list[str]) -> str | None:
    """The closest valid key to an unknown one, e.g. 'train.bach_size' -> 'train.batch_size'."""
    model: type[BaseModel] = JobConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        candidates = [
            a
            for a in getattr(ann, "__args__", (ann,))
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if not candidates:
            return None
        model = candidates[0]
    match = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1)
    return ".".join([*loc[:-1], match[0]]) if match else None
