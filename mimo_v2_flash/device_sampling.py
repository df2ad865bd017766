"""Token sampling with torch operations on the kernels' device (`mimo_kernels.launch.device()`),
so a device step reads back one token id instead of a vocabulary of logits.

Same rule as `model.sample`: argmax (lowest id on ties) at temperature 0; otherwise softmax of
logits / temperature over the `top_k` most likely tokens and the smallest set reaching `top_p`.
Greedy choices are identical to `model.sample`; sampled ones follow the same distribution from
torch's random stream (a `torch.Generator` seeded like the NumPy one), so they differ from the
NumPy path's draws.
"""
from __future__ import annotations

import numpy as np

from mimo_kernels.launch import device, to_device


class DeviceSampler:
    """`sampler(logits) -> token id`, with the settings of one generation."""

    def __init__(self, temperature: float, top_k: int | None, top_p: float | None, seed: int):
        import torch
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.where = device()
        self.generator = torch.Generator(device=self.where).manual_seed(seed)

    def __call__(self, logits) -> int:
        import torch
        z = to_device(np.ascontiguousarray(logits, np.float32), self.where)
        if self.temperature <= 0:
            return int(torch.argmax(z))            # first maximal index, as np.argmax
        z = z.double() / self.temperature
        if self.top_k is not None and self.top_k < z.numel():
            z = torch.where(z >= torch.topk(z, self.top_k).values[-1], z, -torch.inf)
        probs = torch.softmax(z, 0)
        if self.top_p is not None and self.top_p < 1.0:
            ordered, order = torch.sort(probs, descending=True, stable=True)
            kept = torch.where(torch.cumsum(ordered, 0) - ordered < self.top_p, ordered, 0.0)   # static shape
            probs = torch.zeros_like(probs).scatter(0, order, kept)
        return int(torch.multinomial(probs, 1, generator=self.generator))
