"""Token sampling with torch operations on the kernels' device (`mimo_kernels.launch.device()`),
so a device step reads back its token ids (one read for the batch) instead of a vocabulary of
logits.

Same rule as `model.sample`: argmax (lowest id on ties) at temperature 0; otherwise softmax of
logits / temperature over the `top_k` most likely tokens and the smallest set reaching `top_p`.
Greedy choices are identical to `model.sample`; sampled ones follow the same distribution from
torch's random stream (a `torch.Generator` seeded like the NumPy one), so they differ from the
NumPy path's draws.
"""
from __future__ import annotations

import numpy as np

from mimo_kernels.launch import device, on_device, to_host


class DeviceSampler:
    """`sampler(rows) -> token ids` (`model.generation_loop`'s `choose`), with the settings of one
    generation: each row of logits (device tensors or host arrays) sampled on the device, the ids
    read back together (one read per step)."""

    def __init__(self, temperature: float, top_k: int | None, top_p: float | None, seed: int):
        import torch
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generator = torch.Generator(device=device()).manual_seed(seed)

    def __call__(self, rows) -> list[int]:
        import torch
        if not len(rows):
            return []
        tokens = torch.stack([self.token(on_device(row, np.float32)) for row in rows])
        return [int(t) for t in to_host(tokens)]

    def token(self, z):
        """The token of one logits vector z [vocab] (float32 device tensor), as a device tensor."""
        import torch
        if self.temperature <= 0:
            return torch.argmax(z)                 # first maximal index, as np.argmax
        z = z.double() / self.temperature
        if self.top_k is not None and self.top_k < z.numel():
            z = torch.where(z >= torch.topk(z, self.top_k).values[-1], z, -torch.inf)
        probs = torch.softmax(z, 0)
        if self.top_p is not None and self.top_p < 1.0:
            ordered, order = torch.sort(probs, descending=True, stable=True)
            kept = torch.where(torch.cumsum(ordered, 0) - ordered < self.top_p, ordered, 0.0)   # static shape
            probs = torch.zeros_like(probs).scatter(0, order, kept)
        return torch.multinomial(probs, 1, generator=self.generator)[0]
