"""Per-sample gradients in one fixed shape: each sample's contribution, whatever the split.

Per-sample gradients are taken over chunks of exactly `CHUNK` samples (the last chunk padded
by repeating a sample whose result is then dropped). A batched forward at batch size 1 can differ in its last bits from
the same rows at batch size 2+, and vmapped per-sample gradients at 2 or 3 from those at 4+
(BLAS picks kernels by size). A fixed shape makes a sample's gradient a function of the
sample and the parameters only: not of the micro-batch size, its position in it, the rank
or k. Layers whose result depends on the split by design (BatchNorm in training mode,
dropout) are refused.

Three ways to compute them, chosen once per model from its layers (`method`), so one model
always takes the same one whatever the split:

- `hooks` (the fastest: about the cost of one normal backward): one batched forward with the
  inputs of every Linear, Conv1D (transformers' GPT-2), Conv2d, Embedding and LayerNorm recorded, one
  backward to those layers' outputs only, and each sample's weight gradient as a batched
  matrix product of its own activations and output gradients. For models whose parameters
  are all held by those layers, each used only there (checked on the autograd graph);
- `expanded`: torch's expanded weights (`call_for_per_sample_grads`), for models of Linear,
  Embedding, LayerNorm, GroupNorm, InstanceNorm and convolutions;
- `vmap`: `torch.func.vmap(grad(...))` of one sample's loss, for anything else that vmap can run.

Where `expanded` or `vmap` cannot run a model, the raw error becomes one line (`UsageError`)
naming the layer and the known fix.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.utils._pytree import tree_leaves, tree_map

from distshare.errors import UsageError

# Samples per vectorized gradient call, always: the one shape every sample is computed in.
# A call costs about the same for 4 or 32 samples on the demo models (its overhead is per
# operation, not per sample), so one large chunk per step beats several small ones.
CHUNK = 32

LossFn = Callable[[nn.Module, Any], torch.Tensor]  # (model, a batch) -> each sample's summed loss, [n]


def refuse_split_dependent(model: nn.Module) -> None:
    """Refuse layers whose output depends on which samples share a batch (exit 2, one line).

    BatchNorm in training mode normalizes by its micro-batch's statistics, and dropout draws
    one random mask per batch: with either, the split of the global batch changes the
    result by design, so no exact arithmetic can make partitions agree.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise UsageError(
                f"sync=exact: layer '{name}' is BatchNorm in training mode, whose output depends on the "
                "micro-batch it sees; use model.norm=group (or none), or sync=ddp"
            )
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0 and module.training:
            raise UsageError(
                f"sync=exact: layer '{name}' is dropout (p={module.p}), whose random mask depends on how "
                "the batch is split; set p=0 or use sync=ddp"
            )


# Layers whose per-sample gradients torch computes in one batched backward (expanded weights).
_EXPANDABLE = (
    nn.Linear,
    nn.Embedding,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.conv._ConvNd,
    nn.modules.instancenorm._InstanceNorm,
)


METHODS = ("auto", "hooks", "expanded", "vmap")


def per_sample_grads(
    model: nn.Module, batch: Any, losses_fn: LossFn, method: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample gradients as one [n, P] matrix (parameters flattened in order), and the n losses.

    The whole matrix, for tests and inspection: exact mode itself takes the chunks' blocks as
    they come (`add_per_sample_grads`) and never holds more than one chunk's.
    """
    size = sum(p.numel() for p in model.parameters())
    leaves = _leaves(batch)
    n = int(leaves[0].shape[0]) if leaves else 0
    rows = next(model.parameters()).new_zeros(n, size)
    done = [0]

    def add(block: torch.Tensor, start: int) -> None:
        if start == 0:
            done[0] += block.shape[0]
        rows[done[0] - block.shape[0] : done[0], start : start + block.shape[1]] = block

    losses = add_per_sample_grads(model, batch, losses_fn, add, method)
    return rows, losses


def add_per_sample_grads(
    model: nn.Module, batch: Any, losses_fn: LossFn, add: Callable[[torch.Tensor, int], None], method: str = "auto"
) -> torch.Tensor:
    """Hand each chunk's per-sample gradients to `add` as they are computed; the n losses.

    `batch` is a pytree (dict / tuple) of tensors with the samples along dim 0;
    `losses_fn(model, batch)` returns each sample's summed loss, [n]. Every gradient call sees
    exactly `CHUNK` samples, whatever n is: the last chunk is padded by repeating its last
    sample, whose rows are dropped. `add(block, start)` receives [samples of the chunk, L]
    blocks: columns [start, start + L) of the parameters flattened in `named_parameters`
    order, in groups of about `GROUP` elements (each chunk gives every column once; the block
    of column 0 comes once per chunk); a block's memory is reused for the next one, so `add`
    copies what it keeps. `method` is "auto" (the model's layers choose: see the
    module docstring), or one of "hooks", "expanded", "vmap".
    """
    if method not in METHODS:
        raise UsageError(f"sync=exact: per-sample method {method!r} is not one of {', '.join(METHODS)}")
    leaves = _leaves(batch)
    n = int(leaves[0].shape[0]) if leaves else 0
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    layout = _layout(model)  # checked once a call: the parameters cannot change between chunks
    chosen = choose_method(model, layout) if method == "auto" else method
    losses = []
    for start in range(0, n, CHUNK):
        take = min(CHUNK, n - start)
        index = torch.arange(start, start + CHUNK, device=leaves[0].device).clamp(max=start + take - 1)
        chunk = tree_map(lambda t, index=index: t.index_select(0, index), batch)
        try:
            loss, blocks = _compute(chosen, layout, model, chunk, losses_fn)
        except _NotHookable as exc:
            if method != "auto":
                raise UsageError(f"sync=exact: method='hooks' cannot run this model: {exc}; use 'vmap'") from None
            # Found on the first chunk the model runs (it is a property of the model, not of
            # the data): every later chunk, step and rank takes the fallback too.
            _fallback[model] = chosen = "vmap"  # a parameter used outside its layer: expanded weights cannot either
            if losses:
                raise UsageError(f"sync=exact: method='hooks' cannot compute this model: {exc}") from None
            loss, blocks = _compute(chosen, layout, model, chunk, losses_fn)
        for column, block in blocks:
            add(block[:take], column)
        losses.append(loss[:take].detach().to(torch.float64).cpu())
    return torch.cat(losses)


# Per-sample gradients leave a chunk in groups of consecutive parameters of about this many
# elements (a parameter larger than it alone): a chunk holds CHUNK x GROUP floats at a time,
# not CHUNK x all parameters. Small models are one group: one block per chunk.
GROUP = 1 << 18

Blocks = Iterator[tuple[int, torch.Tensor]]  # (first column, [CHUNK, L] per-sample gradients)


class _Layout:
    """The flattened parameters' columns, and their groups: what a chunk's blocks are cut along."""

    def __init__(self, model: nn.Module) -> None:
        self.named = list(model.named_parameters())
        self.offsets: dict[int, int] = {}
        self.group_of: dict[int, int] = {}
        self.groups: list[tuple[int, int]] = []  # (first column, size)
        offset = first = 0
        for _, p in self.named:
            self.offsets[id(p)] = offset
            # A parameter of GROUP elements or more is a group of its own: its rule then writes
            # the block itself (`_hook_grads`).
            if offset > first and (offset - first >= GROUP or p.numel() >= GROUP):
                self.groups.append((first, offset - first))
                first = offset
            self.group_of[id(p)] = len(self.groups)
            offset += p.numel()
        self.groups.append((first, offset - first))
        self.members: list[list[nn.Parameter]] = [[] for _ in self.groups]  # each group's parameters
        for _, p in self.named:
            self.members[self.group_of[id(p)]].append(p)
        self.size = offset
        self.key = tuple(id(p) for _, p in self.named)
        self.method = _static_method(model, hooks=True)  # what "auto" takes, by the layers
        self._ruled: list[tuple[str, nn.Module, str]] | None = None
        self._own: dict[int, tuple[nn.Parameter, ...]] = {}
        self._buffer: torch.Tensor | None = None

    def block(self, group: int) -> torch.Tensor:
        """An uninitialized [CHUNK, group size] block, in one buffer reused for every group, chunk and step.

        A block is valid until the next one is asked for: whoever keeps it must copy it. A
        fresh allocation of this size costs more than computing it (the pages are faulted in
        anew each time)."""
        like = self.named[0][1]
        if self._buffer is None or (self._buffer.dtype, self._buffer.device) != (like.dtype, like.device):
            self._buffer = like.new_empty(CHUNK * max(size for _, size in self.groups))
        return self._buffer[: CHUNK * self.groups[group][1]].view(CHUNK, -1)

    def own(self, module: nn.Module) -> tuple[nn.Parameter, ...]:
        """`module.parameters(recurse=False)`, looked up once per module."""
        held = self._own.get(id(module))
        if held is None:
            held = self._own[id(module)] = tuple(module.parameters(recurse=False))
        return held

    def ruled(self, model: nn.Module) -> list[tuple[str, nn.Module, str]]:
        """(name, module, kind) of the layers with a per-sample rule that hold parameters."""
        if self._ruled is None:
            self._ruled = [
                (name, module, kind)
                for name, module in model.named_modules()
                if (kind := _hook_kind(module)) is not None and next(module.parameters(recurse=False), None) is not None
            ]
        return self._ruled

    def blocks(self, grads: Iterable[tuple[torch.Tensor, torch.Tensor]], rows: int) -> Blocks:
        """Each group's block from its parameters' [rows, ...] gradients, given in `named` order."""
        current, parts = -1, []
        for p, g in grads:
            group = self.group_of[id(p)]
            if parts and group != current:
                yield self.groups[current][0], torch.cat(parts, dim=1, out=self.block(current)[:rows])
                parts = []
            current = group
            parts.append(g.reshape(rows, -1))
        if parts:
            yield self.groups[current][0], torch.cat(parts, dim=1, out=self.block(current)[:rows])


_layouts: weakref.WeakKeyDictionary[nn.Module, _Layout] = weakref.WeakKeyDictionary()


def _layout(model: nn.Module) -> _Layout:
    """The model's layout, made once (remade if its parameters change)."""
    layout = _layouts.get(model)
    if layout is None or layout.key != tuple(id(p) for p in model.parameters()):
        _layouts[model] = layout = _Layout(model)
    return layout


# Models whose hooks check failed once (a parameter used outside its layer): their fallback.
_fallback: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def choose_method(model: nn.Module, layout: _Layout | None = None) -> str:
    """The method "auto" takes for `model`: fixed by its layers (and a failed hooks check)."""
    return _fallback.get(model) or (layout or _layout(model)).method


def _static_method(model: nn.Module, hooks: bool) -> str:
    if hooks and _hookable(model):
        return "hooks"
    return "expanded" if _expandable(model) else "vmap"


def _compute(
    method: str, layout: _Layout, model: nn.Module, chunk: Any, losses_fn: LossFn
) -> tuple[torch.Tensor, Blocks]:
    """The chunk's losses, and its per-sample gradients as blocks (computed as they are taken)."""
    if method == "hooks":
        return _hook_grads(layout, model, chunk, losses_fn)
    with _Explained(model, method):
        if method == "expanded":
            return _expanded_grads(layout, model, chunk, losses_fn)
        return _vmap_grads(layout, model, losses_fn)(model, chunk, losses_fn)


def _expandable(model: nn.Module) -> bool:
    return all(
        isinstance(m, _EXPANDABLE) for m in model.modules() if next(m.parameters(recurse=False), None) is not None
    )


class _Forward:
    """Stands in for the model inside `losses_fn`: calling it runs the expanded-weights forward."""

    def __init__(self, forward: Callable[..., Any]) -> None:
        self.forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)


def _expanded_grads(layout: _Layout, model: nn.Module, chunk: Any, losses_fn: LossFn) -> tuple[torch.Tensor, Blocks]:
    from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

    params = [p for _, p in model.named_parameters()]
    forward = call_for_per_sample_grads(model, batch_size=CHUNK, loss_reduction="sum")
    losses = losses_fn(_Forward(forward), chunk)  # type: ignore[arg-type]
    losses.sum().backward()

    def taken(p: torch.Tensor) -> torch.Tensor:
        g, p.grad_sample, p.grad = p.grad_sample, None, None  # type: ignore[attr-defined]
        return g

    return losses, layout.blocks(((p, taken(p)) for p in params), CHUNK)


def _vmap_grads(layout: _Layout, model: nn.Module, losses_fn: LossFn) -> Callable[..., tuple[torch.Tensor, Blocks]]:
    params = {f"m.{k}": v.detach() for k, v in model.named_parameters()}
    buffers = {f"m.{k}": v for k, v in model.named_buffers()}

    def one(p: dict[str, torch.Tensor], sample: Any) -> torch.Tensor:
        one_batch = tree_map(lambda t: t.unsqueeze(0), sample)
        return functional_call(_WithLoss(model, losses_fn), (p, buffers), (one_batch,))

    grads_of = vmap(grad_and_value(one), in_dims=(None, 0))

    def chunk_grads(model: nn.Module, chunk: Any, losses_fn: LossFn) -> tuple[torch.Tensor, Blocks]:
        g, loss = grads_of(params, chunk)
        held = [p for _, p in model.named_parameters()]  # `params` holds detached copies: other ids
        return loss, layout.blocks(zip(held, (g[k] for k in params), strict=True), CHUNK)

    return chunk_grads


class _WithLoss(nn.Module):
    """The model and its loss as one module, so `functional_call` can swap in the parameters."""

    def __init__(self, model: nn.Module, losses_fn: LossFn) -> None:
        super().__init__()
        self.m = model
        self.losses_fn = losses_fn

    def forward(self, sample: Any) -> torch.Tensor:
        return self.losses_fn(self.m, sample)[0]  # a batch of one: its one loss


def _leaves(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


# ---------------------------------------------------------------- hooks: per-sample rules per layer


class _NotHookable(Exception):
    """The hooks method cannot compute this model (found while running it); the reason."""


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2): a linear layer with its weight stored [in, out], y = x @ W + b.
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def _hook_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if _is_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.Embedding) and module.max_norm is None and not module.scale_grad_by_freq:
        return "embedding"
    if isinstance(module, nn.LayerNorm):
        return "layer_norm"
    if (
        type(module) is nn.Conv2d
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    ):
        return "conv2d"
    return None


def _hookable(model: nn.Module) -> bool:
    """Every trainable parameter is held by a layer with a per-sample rule.

    A module without a rule may hold a parameter too, if a ruled layer holds the same one
    (BERT's output bias is `cls.predictions.bias` and `decoder.bias`); that it is used only
    through the ruled layer is checked on the autograd graph of every chunk.
    """
    covered = {id(p) for m in model.modules() if _hook_kind(m) for p in m.parameters(recurse=False)}
    return all(id(p) in covered for p in model.parameters() if p.requires_grad)


class _Call:
    """One call of a ruled layer: its input and output (the output's gradient comes later)."""

    __slots__ = ("module", "kind", "x", "y")

    def __init__(self, module: nn.Module, kind: str, x: torch.Tensor, y: torch.Tensor) -> None:
        self.module, self.kind, self.x, self.y = module, kind, x, y


def _hook_grads(layout: _Layout, model: nn.Module, chunk: Any, losses_fn: LossFn) -> tuple[torch.Tensor, Blocks]:
    """Per-sample gradients from one batched forward and one backward to the ruled layers' outputs.

    A sample's weight gradient is a product of its own rows only (its activations and output
    gradients, summed over its positions): `torch.bmm` over the chunk, one matrix product per
    sample in the fixed chunk shape, so no other sample of the chunk enters it.
    """
    calls: list[_Call] = []
    handles = []
    for name, module, kind in layout.ruled(model):
        if kind == "embedding":
            handles.append(module.register_forward_pre_hook(_per_sample_lookup))
        handles.append(module.register_forward_hook(_recorder(calls, kind, name)))
    try:
        losses = losses_fn(model, chunk)
    finally:
        for h in handles:
            h.remove()
    if losses.shape != (CHUNK,):
        raise UsageError(
            f"sync=exact: the per-sample loss function returned shape {tuple(losses.shape)}, "
            f"not one loss per sample ({CHUNK},): sum each sample's losses, e.g. .view(n, -1).sum(1)"
        )
    reached = [c for c in calls if c.y.requires_grad]
    outputs = torch.autograd.grad(losses.sum(), [c.y for c in reached], allow_unused=True) if reached else []
    used = [(c, g) for c, g in zip(reached, outputs, strict=True) if g is not None]
    _check_every_use_ruled(losses, used, layout)
    touching: dict[int, list[tuple[_Call, torch.Tensor]]] = {}  # group -> the calls of its parameters
    for call, gy in used:
        for group in sorted({layout.group_of[id(p)] for p in layout.own(call.module)}):
            touching.setdefault(group, []).append((call, gy))

    def blocks() -> Blocks:
        # One group at a time: its block is filled and handed over before the next reuses it.
        for group, (first, _) in enumerate(layout.groups):
            block = layout.block(group)
            members = layout.members[group]
            # A parameter alone in its group (GROUP elements or more) has the whole block: its
            # first use's rule computes in it, not in a fresh tensor of the block's size
            # (faulted in anew, then copied) for every chunk.
            alone = len(members) == 1
            written: set[int] = set()
            # A tied parameter (GPT-2's lm_head and wte) gets one contribution per use, in the
            # forward's order: the same order for every sample and split (0 + g is g, exactly).
            for call, gy in touching.get(group, ()):
                for p, g in _rule(call, gy, group, layout, block if alone and not written else None):
                    start = layout.offsets[id(p)] - first
                    part = block[:, start : start + p.numel()]
                    if id(p) in written:
                        part += g.reshape(CHUNK, -1)
                    else:
                        if g.data_ptr() != part.data_ptr():  # not computed in place
                            part.copy_(g.reshape(CHUNK, -1))
                        written.add(id(p))
            for p in members:  # a parameter no call reached: its gradient is 0
                if id(p) not in written:
                    start = layout.offsets[id(p)] - first
                    block[:, start : start + p.numel()] = 0
            yield first, block

    return losses.detach(), blocks()


def _per_sample_lookup(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    # An embedding looked up with a batch of 1 (positions shared by every sample: GPT-2's and
    # BERT's position ids) gets one gradient for all samples, summed by broadcasting. Looked up
    # once per sample instead, its rows are the same values (a lookup is a copy), so a model
    # that broadcasts them computes the same; each sample's rows then get their own gradient.
    ids = args[0]
    if isinstance(ids, torch.Tensor) and ids.dim() >= 1 and ids.shape[0] == 1:
        return (ids.expand(CHUNK, *ids.shape[1:]), *args[1:])
    return None


def _recorder(calls: list[_Call], kind: str, name: str) -> Callable[..., None]:
    def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
            raise _NotHookable(f"layer '{name}' was called without a tensor input")
        if x.dim() < 1 or x.shape[0] != CHUNK:
            # Samples must run along dim 0 for a sample's rows to be its own.
            raise _NotHookable(f"layer '{name}' sees an input of shape {tuple(x.shape)}, not samples along dim 0")
        calls.append(_Call(module, kind, x.detach(), output))

    return record


def _rule(
    call: _Call, gy: torch.Tensor, group: int, layout: _Layout, into: torch.Tensor | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(parameter, its per-sample gradient [CHUNK, ...]) of one call, for its trainable
    parameters in `group` only: a layer whose weight and bias fall in two groups computes each
    product once, not once per group. `into`: a contiguous [CHUNK, numel] tensor the gradient
    is computed in, where the group's one parameter is the call's one wanted."""
    m, x, n = call.module, call.x, CHUNK

    def wanted(p: torch.Tensor | None) -> bool:
        return p is not None and p.requires_grad and layout.group_of[id(p)] == group

    def dest(p: torch.Tensor) -> torch.Tensor | None:
        return None if into is None else into.view(n, *p.shape)

    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    if call.kind in ("linear", "conv1d"):
        x2 = x.reshape(n, -1, x.shape[-1])
        g2 = gy.reshape(n, -1, gy.shape[-1])
        if wanted(m.weight):
            if call.kind == "linear":  # weight [out, in]
                out.append((m.weight, torch.bmm(g2.transpose(1, 2), x2, out=dest(m.weight))))
            else:  # Conv1D: weight [in, out]
                out.append((m.weight, torch.bmm(x2.transpose(1, 2), g2, out=dest(m.weight))))
        if wanted(m.bias):
            out.append((m.bias, torch.sum(g2, dim=1, out=dest(m.bias))))
    elif call.kind == "embedding":
        if wanted(m.weight):
            vocab, width = m.weight.shape
            ids = x.reshape(n, -1) + torch.arange(n, device=x.device).unsqueeze(1) * vocab
            g = m.weight.new_zeros(n * vocab, width) if into is None else into.view(n * vocab, width).zero_()
            g.index_add_(0, ids.reshape(-1), gy.reshape(-1, width))
            g = g.view(n, vocab, width)
            if m.padding_idx is not None:
                g[:, m.padding_idx] = 0  # as F.embedding's backward: the padding row learns nothing
            out.append((m.weight, g))
    elif call.kind == "conv2d":
        g2 = gy.reshape(n, gy.shape[1], -1)
        if wanted(m.weight):
            # A sample's weight gradient: its output gradient [out, L] times its unfolded input
            # [L, in x kh x kw] (L output positions), one matrix product per sample of the chunk.
            cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            product = None if into is None else into.view(n, m.weight.shape[0], -1)
            out.append((m.weight, torch.bmm(g2, cols.transpose(1, 2), out=product).view(n, *m.weight.shape)))
        if wanted(m.bias):
            out.append((m.bias, torch.sum(g2, dim=2, out=dest(m.bias))))
    else:  # layer_norm
        shape = m.normalized_shape
        g2 = gy.reshape(n, -1, *shape)
        if wanted(m.weight):
            x_hat = F.layer_norm(x, shape, eps=m.eps).reshape(n, -1, *shape)
            out.append((m.weight, torch.sum(g2 * x_hat, dim=1, out=dest(m.weight))))
        if wanted(m.bias):
            out.append((m.bias, torch.sum(g2, dim=1, out=dest(m.bias))))
    return out


def _check_every_use_ruled(losses: torch.Tensor, used: list[tuple[_Call, torch.Tensor]], layout: _Layout) -> None:
    """Each parameter enters the loss's graph exactly as often as ruled layers used it.

    A use the hooks did not see (a weight read directly by its parent module, say) would
    give that parameter a per-sample gradient without that use: counting the graph's edges
    into each parameter makes such a model fall back instead of computing less.
    """
    edges: dict[int, int] = {}
    seen: set[Any] = set()
    stack = [losses.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            if var is not None:
                edges[id(var)] = edges.get(id(var), 0) + 1
            else:
                stack.append(nxt)
    ruled: dict[int, int] = {}
    for call, _ in used:
        for p in layout.own(call.module):
            ruled[id(p)] = ruled.get(id(p), 0) + 1
    for name, p in layout.named:
        if p.requires_grad and edges.get(id(p), 0) != ruled.get(id(p), 0):
            raise _NotHookable(
                f"parameter '{name}' enters the loss {edges.get(id(p), 0)} times, "
                f"through layers with a per-sample rule {ruled.get(id(p), 0)} times"
            )


# ---------------------------------------------------------------- raw errors, explained


class _Explained:
    """Turns a failure of expanded weights or vmap inside a model into one line: layer, cause, fix.

    The innermost module running when the error came is the layer named (forward hooks keep
    the stack); the operation is the innermost frame outside torch.
    """

    def __init__(self, model: nn.Module, method: str) -> None:
        self.model, self.method = model, method
        self.stack: list[str] = []
        self.handles: list[Any] = []

    def __enter__(self) -> None:
        for name, module in self.model.named_modules():
            self.handles.append(module.register_forward_pre_hook(lambda *_, name=name: self.stack.append(name)))
            self.handles.append(module.register_forward_hook(self._leave))

    def _leave(self, *_: Any) -> None:
        self.stack.pop()

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: Any) -> bool:
        for h in self.handles:
            h.remove()
        if not isinstance(exc, RuntimeError):
            return False
        layer = f"layer '{self.stack[-1] or type(self.model).__name__}'" if self.stack else "the model"
        raise UsageError(_explain(self.method, layer, _operation(tb), str(exc))) from exc


def _explain(method: str, layer: str, operation: str, error: str) -> str:
    first = error.strip().splitlines()[0] if error.strip() else type(error).__name__
    if method == "expanded" and "batch size matching input" in error:
        return (
            f"sync=exact: expanded weights: {layer} is called with a batch of 1 (ids the model builds once for "
            "every sample, e.g. BERT's position_ids / token_type_ids): pass position_ids and token_type_ids "
            "of the batch's size, or use method='hooks'"
        )
    if method == "vmap" and (".item()" in error or "data-dependent control flow" in error):
        return (
            f"sync=exact: vmap: {layer} calls .item() or branches on a tensor's value at {operation} "
            "(transformers' attention-mask code does): use method='hooks' (Linear, Conv1D, Embedding and "
            "LayerNorm layers), or pass no attention_mask for a right-padded causal LM whose padding labels are -100"
        )
    other = "'vmap'" if method == "expanded" else "'hooks' or 'expanded'"
    return f"sync=exact: {method} cannot run {layer} at {operation}: {first}; try method={other}"


def _operation(tb: Any) -> str:
    """The innermost frame of the traceback outside torch: file name, line and function."""
    where = "unknown"
    while tb is not None:
        code = tb.tb_frame.f_code
        if "/torch/" not in code.co_filename and "distshare/numerics" not in code.co_filename:
            where = f"{code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno} ({code.co_name})"
        tb = tb.tb_next
    return where
