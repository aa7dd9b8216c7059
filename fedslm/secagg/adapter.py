"""Between adapters and the protocol: what a site masks, and what the coordinator does with the sum.

A site masks its *update*, the trained adapter minus the global adapter it received, flattened
over the sorted tensor names as one float32 vector, weighted by its training records. The
coordinator unmasks ``sum_i w_i delta_i`` and ``sum_i w_i``, whose ratio is the records-weighted
mean update; adding it to the global adapter is FedAvg of the adapters (the mean of
``global + delta_i`` is ``global + mean delta_i``), which is what ``ffa`` and ``fedavg-factors``
compute in the clear. Pure functions of tensors, so both sides and the tests share them.
"""

from __future__ import annotations

import numpy as np
import torch

from fedslm.config import JobConfig
from fedslm.secagg.messages import SecAggError, SecAggParams, SecAggResult

AdapterState = dict[str, torch.Tensor]


def layout(state: AdapterState) -> list[tuple[str, tuple[int, ...]]]:
    """The order and shapes of the flattened vector: tensor names sorted, so every party
    agrees without sending names."""
    return [(k, tuple(state[k].shape)) for k in sorted(state)]


def flatten(state: AdapterState) -> np.ndarray:
    """All tensors of ``state`` (sorted by name) as one float32 vector."""
    if not state:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(
        [state[k].detach().to("cpu", torch.float32).reshape(-1).numpy() for k in sorted(state)]
    ).astype(np.float32, copy=False)


def unflatten(vector: np.ndarray, template: AdapterState) -> AdapterState:
    """``vector`` cut into tensors with the names and shapes of ``template`` (float32)."""
    out: AdapterState = {}
    offset = 0
    for name, shape in layout(template):
        size = int(np.prod(shape, dtype=np.int64))
        chunk = np.asarray(vector[offset : offset + size], dtype=np.float32)
        out[name] = torch.from_numpy(chunk.copy()).reshape(shape)
        offset += size
    if offset != len(vector):
        raise SecAggError(
            f"the aggregated vector has {len(vector)} values, the adapter has {offset}"
        )
    return out


def update_vector(trained: AdapterState, global_state: AdapterState) -> np.ndarray:
    """A site's update ``trained - global`` as the float32 vector it masks."""
    if set(trained) != set(global_state):
        raise SecAggError("the trained adapter and the global adapter hold different tensors")
    return flatten({k: trained[k].to(torch.float32) - global_state[k].to(torch.float32)
                    for k in trained})  # fmt: skip


def vector_size(state: AdapterState) -> int:
    """Length of ``flatten(state)``; the masked vector has one more element (the weight)."""
    return sum(int(t.numel()) for t in state.values())


def mean_state(global_state: AdapterState, result: SecAggResult) -> AdapterState:
    """``global + sum_i w_i delta_i / sum_i w_i``: the FedAvg of the survivors' adapters,
    within ``result.sum_error_bound / result.total_weight`` per coordinate (plus clipping)."""
    mean = result.mean()
    if len(mean) != vector_size(global_state):
        raise SecAggError(
            f"the secure sum has {len(mean)} values, the global adapter {vector_size(global_state)}"
        )
    delta = unflatten(mean.astype(np.float32), global_state)
    return {k: global_state[k].to(torch.float32) + delta[k] for k in global_state}


def job_params(job: JobConfig, session: bytes, n_sites: int) -> SecAggParams:
    """The session's public parameters from the job config (every party derives the same)."""
    s = job.federation.secagg
    return SecAggParams(
        session=session,
        n_sites=n_sites,
        clip_range=s.clip_range,
        threshold=s.threshold,
        bits=s.bits,
        max_weight=s.max_weight,
    )


def session_id(job_id: str, round_num: int) -> bytes:
    """Unique per job and round: keys, masks and ciphertexts are bound to it."""
    return f"fedslm/{job_id}/round-{round_num}".encode()
