"""A forward pass that stops at the last hook it needs: ``forward_until``.

Harvests and contrast extraction read one hook (or a few) of a model; the blocks after the last
of them, and the logits (batch x pos x vocab floats), are not computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class _StopForward(Exception):
    """Raised once every requested hook has fired: the rest of the forward pass is not needed."""


def forward_until(bridge: Any, ids: torch.Tensor, mask: torch.Tensor | None,
                  names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Detached activations at ``names`` (hook name -> tensor as the hook saw it) from one forward
    pass of ``bridge`` that stops once all of them have fired. A hook the model never routes
    through is missing from the result: the caller names the error."""
    got: dict[str, torch.Tensor] = {}

    def grabber(name: str):
        def grab(t: torch.Tensor, hook: Any) -> None:
            got[name] = t.detach()
            if len(got) == len(names):
                raise _StopForward
        return grab

    try:
        bridge.run_with_hooks(ids, fwd_hooks=[(n, grabber(n)) for n in names], attention_mask=mask, return_type=None)
    except _StopForward:
        pass
    return got
