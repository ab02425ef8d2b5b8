"""AdamW with Q-GaLore's projected, quantised state, in plain torch."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .int8_linear import FLOAT_GRAD, int8_layer_of
from .projector import QGaLoreProjector
from .quantization import dequantize, pick_group_size, quantize

_PROJECTOR_OPTIONS = ("rank", "update_proj_gap", "scale", "proj_type", "cos_threshold", "gamma_proj", "queue_size")


class QGaLoreAdamW(torch.optim.Optimizer):
    """AdamW whose groups with a `rank` key are trained as Q-GaLore: gradients projected by an INT4
    `QGaLoreProjector` (lazy SVD refresh), Adam moments kept at rank size in `moment_dtype`, and optionally the
    weights themselves rounded to INT8 after each step with stochastic rounding.

    The INT8 weights can be real: parameters of `Int8WeightLinear` layers (`quantize_linear_weights`) hold INT8
    codes; their float gradient is read from `param.float_grad`, the update is applied to the dequantised weight
    and the result is stored as INT8 again (stochastic rounding), so weight memory drops to about a quarter.

    Groups without `rank` are plain AdamW. The arithmetic of each step matches galore-torch's `GaLoreAdamW`.

    Args:
        params (Iterable): parameters or groups; a group's `rank`, `update_proj_gap`, `scale`, `proj_type`,
            `cos_threshold`, `gamma_proj`, `queue_size` configure its projector (see `QGaLoreProjector`).
        lr: AdamW's learning rate.
        betas: AdamW's moment decay rates.
        eps: AdamW's denominator term.
        weight_decay: decoupled weight decay.
        proj_bits: bits of the projection matrices (4 or 8), or None for float projections (plain GaLore).
        proj_group_size: values per quantisation group of the projections.
        moment_dtype: dtype of the low-rank Adam moments (bfloat16 halves them; float32 is GaLore's).
        weight_bits: 8 to keep projected float weights on an INT8 grid with stochastic rounding (simulated: the
            values are quantised, the storage stays float); None to leave them in float. Weights really stored
            as INT8 (`Int8WeightLinear`, see `quantize_linear_weights`) are always rounded back to INT8
            stochastically, whatever this says.
        weight_group_size: values per quantisation group of the weights.
        cos_threshold: default of the lazy SVD refresh: the mean cosine above which a subspace counts as stable.
        gamma_proj: default factor by which a stable layer's SVD gap grows.
        queue_size: default number of recent cosines averaged.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        proj_bits: int | None = 4,
        proj_group_size: int = 256,
        moment_dtype: torch.dtype = torch.bfloat16,
        weight_bits: int | None = None,
        weight_group_size: int = 256,
        cos_threshold: float = 0.4,
        gamma_proj: float = 2.0,
        queue_size: int = 5,
    ):
        if weight_bits not in (None, 8):
            raise ValueError(f"weight_bits must be 8 or None, got {weight_bits}")
        if proj_bits not in (None, 4, 8):
            raise ValueError(f"proj_bits must be 4, 8 or None, got {proj_bits}")
        defaults = {
            "lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "proj_bits": proj_bits,
            "proj_group_size": proj_group_size, "moment_dtype": moment_dtype, "weight_bits": weight_bits,
            "weight_group_size": weight_group_size, "cos_threshold": cos_threshold, "gamma_proj": gamma_proj,
            "queue_size": queue_size,
        }  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter that has a gradient (or, for INT8 weights, a float gradient).

        Args:
            closure: optional callable that recomputes the loss, as in `torch.optim`.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if _gradient_of(param) is not None:
                    self._update(param, group)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients, including the float gradients of INT8 weights.

        Args:
            set_to_none: drop the gradients (default) rather than zeroing them in place.
        """
        super().zero_grad(set_to_none=set_to_none)
        for group in self.param_groups:
            for param in group["params"]:
                if int8_layer_of(param) is not None:
                    setattr(param, FLOAT_GRAD, None)

    def _update(self, param: torch.Tensor, group: dict) -> None:
        state = self.state[param]
        projected = "rank" in group
        if not state:
            state["step"] = 0
            if projected:
                options = {k: group[k] for k in _PROJECTOR_OPTIONS if k in group}
                state["projector"] = QGaLoreProjector(
                    bits=group["proj_bits"], group_size=group["proj_group_size"], **options
                )
        grad = _gradient_of(param)
        int8_layer = int8_layer_of(param)
        if projected:
            grad = state["projector"].project(grad, state["step"])
        moment_dtype = group["moment_dtype"] if projected else grad.dtype
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad, dtype=moment_dtype)
            state["exp_avg_sq"] = torch.zeros_like(grad, dtype=moment_dtype)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        # Moments are updated in float32 and stored back in their (possibly lower) precision.
        exp_avg = state["exp_avg"].float().mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        state["exp_avg"].copy_(exp_avg)
        state["exp_avg_sq"].copy_(exp_avg_sq)
        step_size = group["lr"] * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
        update = exp_avg / (exp_avg_sq.sqrt() + group["eps"])
        if projected:
            update = state["projector"].project_back(update)
        if int8_layer is not None:
            delta = update.float().mul_(-step_size)
            if group["weight_decay"] > 0:
                weight = int8_layer.dequantized_weight(torch.float32)
                delta.add_(weight.add_(delta), alpha=-group["lr"] * group["weight_decay"])
                del weight
            int8_layer.apply_update_(delta, stochastic=True)
            setattr(param, FLOAT_GRAD, None)
            return
        param.add_(update.to(param.dtype), alpha=-step_size)
        if group["weight_decay"] > 0:
            param.add_(param, alpha=-group["lr"] * group["weight_decay"])
        if projected and group["weight_bits"] is not None:
            size = pick_group_size(param.numel(), group["weight_group_size"])
            param.copy_(dequantize(quantize(param, group["weight_bits"], size, stochastic=True)))

    def state_nbytes(self) -> int:
        """Bytes of optimizer state: moments, projection matrices (as stored) and leading vectors."""
        total = 0
        for state in self.state.values():
            total += sum(state[key].nbytes for key in ("exp_avg", "exp_avg_sq") if key in state)
            if "projector" in state:
                total += state["projector"].state_nbytes()
        return total


def _gradient_of(param: torch.Tensor) -> torch.Tensor | None:
    """`param.grad`, or the float gradient of an INT8 weight."""
    return getattr(param, FLOAT_GRAD, None) if int8_layer_of(param) is not None else param.grad
