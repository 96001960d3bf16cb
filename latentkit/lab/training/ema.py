"""An exponential moving average of a network's weights, the weights diffusion models ship."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from latentkit.errors import InvalidArgumentError


class EMA:
    """A shadow copy of ``module``'s trainable parameters, averaged after each optimiser step.

    ``shadow = d * shadow + (1 - d) * param`` with ``d = min(decay, (1 + n) / (10 + n))`` at
    the ``n``-th update (n = 1, 2, ...): the warm-up of LDM's ``LitEma``, which lets the
    average forget the random initialisation quickly (Song & Ermon 2020, sec. 3.5 motivate
    the EMA for diffusion models; Ho et al. 2020, app. B use decay 0.9999).

    >>> net = nn.Linear(2, 2)
    >>> ema = EMA(net, decay=0.999)
    >>> ema.update(net)  # after each optimiser step
    >>> ema.copy_to(net)  # before evaluating or saving
    """

    def __init__(self, module: nn.Module, *, decay: float = 0.9999, warmup: bool = True) -> None:
        if not 0.0 <= decay <= 1.0:
            raise InvalidArgumentError(f"decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        """How many times `update` has run."""
        self.shadow: dict[str, Tensor] = {
            name: p.detach().clone()
            for name, p in module.named_parameters()
            if p.requires_grad and p.is_floating_point()
        }
        if not self.shadow:
            raise InvalidArgumentError("the module has no trainable floating-point parameters")

    def current_decay(self) -> float:
        """The decay the next `update` will use."""
        n = self.updates + 1
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Move the average towards ``module``'s current parameters."""
        d = self.current_decay()
        params = dict(module.named_parameters())
        for name, shadow in self.shadow.items():
            if name not in params:
                raise InvalidArgumentError(f"the module has no parameter {name!r}")
            # lerp: shadow + (1 - d) * (param - shadow) = d * shadow + (1 - d) * param
            shadow.lerp_(params[name].detach().to(shadow.dtype), 1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Overwrite ``module``'s averaged parameters with the average."""
        params = dict(module.named_parameters())
        for name, shadow in self.shadow.items():
            params[name].copy_(shadow)

    def state_dict(self) -> dict[str, object]:
        """The average and counters, for checkpoints (`load_state_dict` restores them)."""
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "updates": self.updates,
            "shadow": dict(self.shadow),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        shadow = state["shadow"]
        if not isinstance(shadow, dict) or set(shadow) != set(self.shadow):
            raise InvalidArgumentError("the EMA state's parameters differ from this module's")
        self.decay = float(state["decay"])  # type: ignore[arg-type]
        self.warmup = bool(state["warmup"])
        self.updates = int(state["updates"])  # type: ignore[call-overload]
        for name, tensor in shadow.items():
            self.shadow[name].copy_(tensor)
