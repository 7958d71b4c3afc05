"""Averages of the trained weights: the evaluated EMA (Flow-GRPO's) and, in `forward_rl`, the old policy of the
forward-process algorithms."""
from __future__ import annotations

import contextlib

import torch


class ParamEMA:
    """Exponential moving average of a model's trained (requires_grad) weights, the model Flow-GRPO evaluates.
    After the n-th update (n = 0, 1, ...): e <- d e + (1 - d) w with d = min(decay, (1 + n) / (10 + n)), so the
    first averages lean on the newest weights instead of the base model's. Kept in fp32."""

    def __init__(self, model, decay: float):
        self.decay, self.n = decay, 0
        self.params = {k: p for k, p in model.named_parameters() if p.requires_grad}
        self.shadow = {k: p.detach().float().clone() for k, p in self.params.items()}

    @torch.no_grad()
    def update(self):
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for k, p in self.params.items():
            self.shadow[k].mul_(d).add_(p.detach().float(), alpha=1 - d)
        self.n += 1

    @contextlib.contextmanager
    def swapped_in(self):
        """The averaged weights in place of the trained ones for the duration (restored even on an error)."""
        saved = {k: p.detach().clone() for k, p in self.params.items()}
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self.shadow[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(saved[k])

    @torch.no_grad()
    def copy_to_model(self):
        """Write the averaged weights into the model (for an export; the trained ones are not kept)."""
        for k, p in self.params.items():
            p.copy_(self.shadow[k])

    def state_dict(self) -> dict:
        return {"n": self.n, "decay": self.decay, "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict):
        if set(state["shadow"]) != set(self.shadow):
            raise ValueError(f"EMA state has weights {sorted(set(state['shadow']) ^ set(self.shadow))[:4]} that do "
                             "not match this model's trained ones (another scenario or model?)")
        self.n = int(state["n"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
