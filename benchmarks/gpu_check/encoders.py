"""The encoders the check runs, built from ``fastenc.bench``'s model specs.

``random_encoder`` loads a ``ModelSpec``'s transformers model (random, perturbed weights; nothing on
disk) through ``Encoder.from_state_dict``; ``shape_encoder`` the same shapes over zeros, for plans that
launch nothing. ``packed`` makes a packed batch of random tokens through the public
``encoder.pack``.
``replayed`` runs the model as ``embed()`` does (``forward_packed``, or the CUDA-graph replay where the
batch fits a graph), which the embed stage times beside ``forward_packed``.
"""

from __future__ import annotations

import torch

from fastenc.bench.e2e import ModelSpec


def random_encoder(spec: ModelSpec, dtype: str, device: torch.device, *, seed: int = 0, cuda_graphs: bool = False,
                   backend: str = "triton"):
    """``spec``'s model with random perturbed weights (``ModelSpec.model``) as a fastenc encoder."""
    from fastenc import Encoder

    model = spec.model(seed)
    return Encoder.from_state_dict(model.config.to_dict(), model.state_dict(), device=device, dtype=dtype,
                                   backend=backend, cuda_graphs=cuda_graphs)


def shape_encoder(spec: ModelSpec, dtype: str):
    """``spec``'s shapes over zero CPU tensors, on the Triton ops: what a plan launches (nothing is
    computed; ``launches.record(plan_only=True)`` skips the kernels)."""
    from fastenc import Encoder

    model = spec.model(weights=False)  # on the meta device: names and shapes only
    state = {name: torch.zeros(t.shape, dtype=t.dtype) for name, t in model.state_dict().items()}  # finite values
    return Encoder.from_state_dict(model.config.to_dict(), state, device="cpu", dtype=dtype, backend="triton",
                                   cuda_graphs=False)


def packed(encoder, lengths: list[int], seed: int = 0):
    """A packed batch of random tokens (ids clear of the special tokens) of the given lengths."""
    generator = torch.Generator().manual_seed(seed)
    config = encoder.config
    width = max(lengths)
    low = min(5, config.vocab_size - 1)
    ids = torch.randint(low, config.vocab_size, (len(lengths), width), generator=generator)
    ids = torch.where(ids == config.pad_token_id, torch.full_like(ids, low), ids)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).to(torch.long)
    return encoder.pack(ids, mask)


def replayed(encoder, batch) -> torch.Tensor:
    """``encoder.model(batch)``: the packed forward, replayed from a CUDA graph when the batch fits one."""
    return encoder.model(batch)
