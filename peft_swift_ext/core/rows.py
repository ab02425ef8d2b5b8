"""Mixed-adapter batches: each row of a batch runs its own adapter, computed in one pass.

``model(**batch, adapter_names=[...])`` names one adapter per row (``"__base__"``: none). While such a call runs,
:func:`current_rows` gives the names to every tuner layer (a ``contextvars`` value, so concurrent threads and
asyncio tasks each see their own batch); a layer applies, to each row, that row's adapter if it holds it and
nothing otherwise. Rows are not split into one sub-batch per adapter: the adapters' weights are stacked and each
row is computed with its own adapter's weights in one vectorised pass (:func:`per_row`), as S-LoRA / Punica do.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.func import functional_call, vmap

#: the adapter name that selects the base model for a row (PEFT's convention)
BASE = "__base__"

_ROWS: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar("adapter_rows", default=None)
_STATE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("adapter_rows_state", default=None)
# How many mixed-batch calls are running in the process. Layers read it first and touch the context variables
# only when it is non-zero: torch.compile cannot trace ContextVar.get (a graph break in every layer), but it
# traces a module-level int, so an ordinary forward stays one graph.
_RUNNING = 0
_RUNNING_LOCK = threading.Lock()


@contextlib.contextmanager
def adapter_rows(names: Sequence[str]) -> Iterator[None]:
    """Inside the block, tuner layers apply ``names[i]`` (an adapter or ``"__base__"``) to row ``i`` of each batch."""
    global _RUNNING
    token, state_token = _ROWS.set(tuple(names)), _STATE.set({})
    with _RUNNING_LOCK:
        _RUNNING += 1
    try:
        yield
    finally:
        with _RUNNING_LOCK:
            _RUNNING -= 1
        _ROWS.reset(token)
        _STATE.reset(state_token)


def rows_state() -> dict:
    """Scratch space shared by the layers during one mixed-batch call (a ``generate`` included): what an earlier
    layer or step decided that later ones need (e.g. which rows carry prompt tokens). Empty outside one."""
    state = _STATE.get() if _RUNNING else None
    return {} if state is None else state


#: the arguments whose first dimension is the batch, in the order they are looked for
_BATCHED_INPUTS = ("input_ids", "inputs_embeds", "pixel_values", "sample", "input_values", "input_features")


def check_rows_fit_batch(names: Sequence[str], call_args: tuple, call_kwargs: dict) -> None:
    """Refuse a call whose batch has another number of rows than ``names`` (when the batch can be seen).

    Args:
        names: one adapter name per row.
        call_args: the call's positional arguments (the first tensor among them is the batch, if no keyword is).
        call_kwargs: the call's keyword arguments (``input_ids``, ``inputs_embeds``, ``pixel_values``, ...).

    Raises:
        ValueError: naming both counts.
    """
    batch = next((call_kwargs[key] for key in _BATCHED_INPUTS if torch.is_tensor(call_kwargs.get(key))), None)
    if batch is None:
        batch = next((value for value in call_args if torch.is_tensor(value)), None)
    if batch is not None and batch.dim() > 0 and batch.shape[0] != len(names):
        raise ValueError(
            f"adapter_names has {len(names)} name(s) but the batch has {batch.shape[0]} row(s); give one adapter "
            f"name (or {BASE!r}) per row"
        )


def checked_row_names(
    adapter_names: object,
    known: Iterable[str],
    training: bool,
    merged: Iterable[str],
    call_kwargs: dict,
    call_args: tuple = (),
) -> tuple[str, ...]:
    """Check a call's ``adapter_names`` before anything runs, and repeat each for beam search.

    Args:
        adapter_names: what the caller passed: one adapter name (or ``"__base__"``) per row.
        known: the adapters rows may name.
        training: whether the model is in training mode (mixed batches are for inference, as in PEFT).
        merged: the adapters merged into the base weights (then no row could run without them).
        call_kwargs: the call's other arguments (``num_beams`` repeats each row's name; the inputs give the
            batch's row count, which must match).
        call_args: the call's positional arguments (the batch, when it is passed positionally).

    Raises:
        ValueError: naming the unknown adapters, a row count that differs from the batch's, or why mixed batches
            are refused now.
    """
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise ValueError(f"adapter_names must be a list with one adapter name per row, got {adapter_names!r}")
    names = tuple(adapter_names)
    if not all(isinstance(name, str) for name in names):
        raise ValueError(f"adapter_names must hold strings (adapter names or {BASE!r}), got {list(names)!r}")
    if training:
        raise ValueError("adapter_names selects adapters per row for inference; put the model in eval mode first")
    merged = sorted(set(merged))
    if merged:
        raise ValueError(f"adapter_names cannot be used while adapters {merged} are merged; call unmerge() first")
    known = set(known)
    unknown = sorted({name for name in names if name != BASE and name not in known})
    if unknown:
        raise ValueError(f"adapter_names names unknown adapter(s) {unknown}; this model has {sorted(known)}")
    check_rows_fit_batch(names, call_args, call_kwargs)
    beams = call_kwargs.get("num_beams")
    if isinstance(beams, int) and beams > 1:
        names = tuple(name for name in names for _ in range(beams))
    return names


@contextlib.contextmanager
def mixed_batch_call(
    tuner, args: tuple, kwargs: dict, prepare: Callable[[nn.Module], None] | None = None
) -> Iterator[None]:
    """A PEFT tuner's ``_enable_peft_forward_hooks``: with ``adapter_names`` in the call, check the names (before
    anything runs) and run the block as a mixed batch; without, run it as it is.

    Args:
        tuner: the tuner model (its ``peft_config`` and ``model``).
        args: the call's positional arguments.
        kwargs: the call's keyword arguments (``adapter_names``, ``num_beams``, the inputs).
        prepare: called with the model before the batch runs (LoRA layers' row hooks).
    """
    names = kwargs.get("adapter_names")
    if names is None:
        yield
        return
    model = tuner.model
    rows = checked_row_names(names, tuner.peft_config, model.training, merged_adapters(model), kwargs, args)
    if prepare is not None:
        prepare(model)
    with adapter_rows(rows):
        yield


class RowCountCheck:
    """Mixin for a tuner model (before PEFT's ``BaseTuner`` in the bases): a mixed-adapter forward whose batch has
    another number of rows than ``adapter_names`` is refused before the model runs. PEFT's task models hand the
    inputs to the tuner's ``forward``, not to the hooks that read ``adapter_names``, so the count is checked here.
    """

    def forward(self, *args, **kwargs):
        """The tuner's forward, after checking a running mixed batch's row count against the inputs.

        Args:
            *args (Any): passed on to the model.
            **kwargs (Any): passed on to the model.
        """
        rows = current_rows()
        if rows is not None:
            check_rows_fit_batch(rows, args, kwargs)
        return super().forward(*args, **kwargs)


def merged_adapters(model: nn.Module) -> set[str]:
    """Every adapter merged into the base weights somewhere in ``model``."""
    return {
        name for module in model.modules() if isinstance(module, BaseTunerLayer) for name in module.merged_adapters
    }


def current_rows() -> tuple[str, ...] | None:
    """The per-row adapter names of the running mixed batch, or None outside one."""
    return _ROWS.get() if _RUNNING else None


@dataclass(frozen=True)
class RowPlan:
    """Which rows of a batch one layer adapts, and with which of its adapters.

    Args:
        adapters: the layer's adapters some row names, in a fixed order (index ``k``).
        rows: the indices of the rows that use one of them.
        index: for each of those rows, the index ``k`` of its adapter.
    """

    adapters: tuple[str, ...]
    rows: torch.Tensor
    index: torch.Tensor

    def __bool__(self) -> bool:
        return bool(self.adapters)


def split_plan(plan: RowPlan, key) -> list[RowPlan]:
    """``plan`` split into the groups of adapters with equal ``key(adapter)`` (settings or network shapes that
    must agree for one vectorised pass).

    Args:
        plan: the layer's plan.
        key: a function of an adapter name returning something hashable.
    """
    groups: dict[object, list[int]] = {}
    for k, name in enumerate(plan.adapters):
        groups.setdefault(key(name), []).append(k)
    if len(groups) == 1:
        return [plan]
    split = []
    for members in groups.values():
        chosen = torch.isin(plan.index, torch.tensor(members))
        remap = {k: j for j, k in enumerate(members)}
        index = torch.tensor([remap[int(k)] for k in plan.index[chosen]], dtype=torch.long)
        split.append(RowPlan(tuple(plan.adapters[k] for k in members), plan.rows[chosen], index))
    return split


def structure_key(module: nn.Module) -> tuple:
    """What must agree for modules to be stacked: their classes and every parameter's and buffer's shape."""
    # Python settings (a scalar weight, a head count) differ between adapters without showing in the tensors
    classes = tuple(
        (type(m).__name__, tuple(sorted((k, v) for k, v in vars(m).items() if isinstance(v, (bool, int, float, str)))))
        for m in module.modules()
    )
    shapes = tuple(
        (name, tuple(t.shape), t.dtype) for name, t in (*module.named_parameters(), *module.named_buffers())
    )
    return classes, shapes


def plan_rows(names: Sequence[str], owned: Iterable[str], batch: int, where: str) -> RowPlan:
    """The :class:`RowPlan` of a layer holding the adapters ``owned``, for per-row ``names``.

    Args:
        names: the per-row adapter names of the batch.
        owned: the adapters this layer holds (and may apply).
        batch: the batch size the layer sees.
        where: the layer, for the error message.
    """
    if len(names) != batch:
        raise ValueError(f"adapter_names has {len(names)} entries but {where} received a batch of {batch} rows")
    owned = frozenset(owned)
    # every layer holding the same adapters gets the same plan, at every step of a generate: made once per call
    memo = rows_state().setdefault("plans", {})
    key = (tuple(names), owned)
    if key not in memo:
        adapters = tuple(dict.fromkeys(name for name in names if name in owned))
        position = {name: k for k, name in enumerate(adapters)}
        chosen = [(row, position[name]) for row, name in enumerate(names) if name in position]
        rows = torch.tensor([row for row, _ in chosen], dtype=torch.long)
        index = torch.tensor([k for _, k in chosen], dtype=torch.long)
        memo[key] = RowPlan(adapters, rows, index)
    return memo[key]


#: Rows go adapter-major (each adapter's rows padded to the largest group) when an adapter's weights outweigh a
#: row's inputs and the padding at most doubles the rows computed; otherwise each row gathers its own copy of its
#: adapter's weights.
GROUPED_PADDING_LIMIT = 2.0


def per_row(modules: Sequence[nn.Module], index: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    """Run row ``i`` of ``inputs`` through ``modules[index[i]]``, every row in one vectorised pass.

    The modules (one adapter's network each) must share one structure and treat rows independently. Their
    parameters are stacked and ``torch.func.vmap`` runs every adapter at once: over the adapters, each on its own
    rows (padded to the largest group), when an adapter's weights outweigh a row's inputs and rows share adapters
    evenly enough; otherwise over the rows, each with a gathered copy of its adapter's weights. Whichever copies
    less is what a mixed batch costs beyond the one-adapter batch.

    Args:
        modules: one module per adapter, identical in structure.
        index: for each row, which module computes it.
        *inputs: the rows' inputs (batch first), passed to the modules positionally.
    """
    if len(modules) == 1:  # one adapter: the module itself, on the whole batch
        return modules[0](*inputs)
    # stacked with torch.stack (not stack_module_state): adapters may differ in requires_grad
    own_params = [dict(module.named_parameters()) for module in modules]
    own_buffers = [dict(module.named_buffers()) for module in modules]
    params = {name: torch.stack([own[name] for own in own_params]) for name in own_params[0]}
    buffers = {name: torch.stack([own[name] for own in own_buffers]) for name in own_buffers[0]}
    index = index.to(inputs[0].device)
    template = modules[0]
    width = int(torch.bincount(index, minlength=len(modules)).max())
    weights = sum(value[0].numel() for value in (*params.values(), *buffers.values()))
    row_inputs = sum(value[0].numel() for value in inputs)
    # gathering weights per row copies `weights` per row; grouping rows copies only the rows' inputs
    if weights > row_inputs and width * len(modules) <= GROUPED_PADDING_LIMIT * index.shape[0]:
        return _adapter_major(template, params, buffers, index, len(modules), inputs)

    def one_row(row_params, row_buffers, *row_inputs):
        batched = tuple(value.unsqueeze(0) for value in row_inputs)
        return functional_call(template, (row_params, row_buffers), batched).squeeze(0)

    gathered_params = {name: value[index] for name, value in params.items()}
    gathered_buffers = {name: value[index] for name, value in buffers.items()}
    return vmap(one_row)(gathered_params, gathered_buffers, *inputs)


def adapter_major_layout(index: torch.Tensor, adapters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each row goes when rows are grouped by adapter: ``(layout, slot)``.

    ``layout[k, j]`` is the ``j``-th row of adapter ``k`` (groups padded to the largest with copies of some row,
    whose results are never read), and row ``i`` (of adapter ``index[i]``, of ``adapters``) sits at
    ``layout[index[i], slot[i]]``.
    """
    counts = torch.bincount(index, minlength=adapters)
    order = torch.argsort(index, stable=True)  # rows grouped by adapter, in their batch order within a group
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(index)
    slot[order] = torch.arange(index.shape[0], device=index.device) - starts[index[order]]
    layout = order[:1].repeat(adapters, int(counts.max()))
    layout[index, slot] = torch.arange(index.shape[0], device=index.device)
    return layout, slot


def _adapter_major(
    template: nn.Module,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    index: torch.Tensor,
    adapters: int,
    inputs: tuple[torch.Tensor, ...],
) -> torch.Tensor:
    """:func:`per_row` over the adapters: adapter ``k`` computes its rows as one batch."""
    layout, slot = adapter_major_layout(index, adapters)

    def one_adapter(adapter_params, adapter_buffers, *adapter_rows):
        return functional_call(template, (adapter_params, adapter_buffers), adapter_rows)

    grouped = vmap(one_adapter)(params, buffers, *(value[layout] for value in inputs))
    return grouped[index, slot]
