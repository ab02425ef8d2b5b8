"""GaLore's gradient projection with Q-GaLore's two savings: an INT4 projection matrix and lazy SVDs."""

from __future__ import annotations

from collections import deque

import torch

from .quantization import dequantize, pick_group_size, quantize


class QGaLoreProjector:
    """Projects a 2-D gradient onto its top-`rank` singular subspace, refreshed by SVD every `update_proj_gap`
    steps.

    Lazy, layer-adaptive refresh (Q-GaLore): after each SVD the leading singular vector is compared with the one
    of the previous SVD. Once the last `queue_size` comparisons average at least `cos_threshold`, the subspace
    of this layer is considered stable and its gap is multiplied by `gamma_proj`, so later SVDs are skipped.
    The absolute cosine is used because a singular vector's sign is arbitrary.

    Args:
        rank: dimension of the subspace.
        update_proj_gap: initial steps between SVDs.
        scale: factor applied when projecting back.
        proj_type: `'std'` (project the smaller side), `'left'` or `'right'`.
        bits: bits of the stored projection (4 or 8), or None to keep it in float.
        group_size: values per quantisation group (reduced to a divisor of the matrix size when needed).
        cos_threshold: mean cosine at or above which the subspace counts as stable.
        gamma_proj: factor by which a stable layer's gap grows.
        queue_size: how many recent cosines are averaged.
    """

    def __init__(
        self,
        rank: int,
        update_proj_gap: int = 200,
        scale: float = 1.0,
        proj_type: str = "std",
        bits: int | None = 4,
        group_size: int = 256,
        cos_threshold: float = 0.4,
        gamma_proj: float = 2.0,
        queue_size: int = 5,
    ):
        if proj_type not in ("std", "left", "right"):
            raise ValueError(f"proj_type must be 'std', 'left' or 'right', got {proj_type!r}")
        self.rank, self.gap, self.scale, self.proj_type = rank, update_proj_gap, scale, proj_type
        self.bits, self.group_size = bits, group_size
        self.cos_threshold, self.gamma_proj = cos_threshold, gamma_proj
        self.similarities: deque[float] = deque(maxlen=queue_size)
        self.matrix = None
        self.side: str | None = None
        self.leading_vector: torch.Tensor | None = None
        self.next_refresh = 0
        self.svd_count = 0

    def project(self, grad: torch.Tensor, step: int) -> torch.Tensor:
        """Low-rank view of `grad`; runs an SVD first when `step` reached the next refresh.

        Args:
            grad: the full 2-D gradient.
            step: the optimizer step (0-based) of this gradient, which decides when the SVD is refreshed.
        """
        if self.matrix is None or step >= self.next_refresh:
            self.refresh(grad, step)
        projection = self.projection(grad.dtype)
        return grad @ projection.t() if self.side == "right" else projection.t() @ grad

    def project_back(self, low_rank: torch.Tensor) -> torch.Tensor:
        """Full-size update from a low-rank one, times `scale`.

        Args:
            low_rank: an update in the projected space (the shape `project` returns).
        """
        projection = self.projection(low_rank.dtype)
        full = low_rank @ projection if self.side == "right" else projection @ low_rank
        return full * self.scale

    def projection(self, dtype: torch.dtype) -> torch.Tensor:
        """The projection matrix, dequantised when it is stored quantised.

        Args:
            dtype: dtype of the returned matrix.
        """
        return self.matrix.to(dtype) if self.bits is None else dequantize(self.matrix, dtype)

    def refresh(self, grad: torch.Tensor, step: int) -> None:
        """SVD of `grad`, the lazy-refresh bookkeeping, and the next refresh step.

        Args:
            grad: the gradient whose top singular vectors become the projection.
            step: the current optimizer step.
        """
        if self.side is None:
            tall = grad.shape[0] >= grad.shape[1]
            self.side = {"std": "right" if tall else "left"}.get(self.proj_type, self.proj_type)
        u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
        projection = vh[: self.rank] if self.side == "right" else u[:, : self.rank]
        leading = vh[0] if self.side == "right" else u[:, 0]
        if self.leading_vector is not None:
            self.similarities.append(torch.dot(self.leading_vector, leading).abs().item())
            full = len(self.similarities) == self.similarities.maxlen
            if full and sum(self.similarities) / len(self.similarities) >= self.cos_threshold:
                self.gap = int(self.gap * self.gamma_proj)
        self.leading_vector = leading
        self.svd_count += 1
        self.next_refresh = step + self.gap
        if self.bits is None:
            self.matrix = projection
        else:
            self.matrix = quantize(projection, self.bits, pick_group_size(projection.numel(), self.group_size))

    def state_nbytes(self) -> int:
        """Bytes held by this projector (matrix and leading vector)."""
        if self.matrix is None:
            return 0
        matrix = self.matrix.nbytes if self.bits is None else self.matrix.nbytes()
        return matrix + self.leading_vector.nbytes
