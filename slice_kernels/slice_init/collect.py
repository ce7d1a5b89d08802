"""Gradient collection for data-driven LoRA inits (SPEC §1 steps 1–2).

Gradients of the target weights are averaged over a few batches into float32 accumulators, layer by layer:
a post-accumulate-grad hook on each target weight adds ``grad / steps`` into that layer's accumulator and
releases ``.grad`` at once, so besides the accumulators at most one layer's ``.grad`` exists at a time
(the one autograd is finishing). Only the target weights require grad during collection; every
parameter's ``requires_grad`` and the model's train/eval mode are restored afterwards, also on error.

Mode: collection runs the model in **eval mode** by default (dropout off), unlike PEFT's LoRA-GA, which
uses train mode. Reason: the init then is a deterministic function of (weights, batches, seed), which makes
runs reproducible, lets distributed ranks and backends agree, and estimates the expected training gradient
without dropout's extra noise. ``train_mode=True`` (``SliceConfig.collect_train_mode``) gives PEFT's
behaviour.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Callable

import torch
from torch import nn

from .. import distributed
from ..errors import NonFiniteGradientError, SliceInitError
from ..modules import is_conv1d, resolve_targets
from ..ops.grad_accum import accumulator
from ..wrappers import refuse_wrapped_model
from .batches import as_batches, is_example, is_tokenizer_output, looks_like_examples, refuse_raw
from .finite import all_finite
from .shard_layout import is_dtensor, local

LossFn = Callable[[nn.Module, object], torch.Tensor]


def _model_device(targets: Mapping[str, nn.Module]) -> torch.device:
    return next(iter(targets.values())).weight.device


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def default_loss(model: nn.Module, batch) -> torch.Tensor:
    check_default_batch(batch)
    out = model(**batch)
    loss = out["loss"] if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise SliceInitError(f"{type(model).__name__}(**batch) returned no loss; pass loss_fn(model, batch) -> loss")
    return loss


def check_default_batch(batch) -> None:
    """What ``default_loss`` needs of a batch (a dict with labels), checked before any forward pass."""
    if not isinstance(batch, Mapping):
        raise SliceInitError(
            f"a batch must be a dict accepted by model(**batch) (got {type(batch).__name__}); "
            f"or pass loss_fn(model, batch) -> loss"
        )
    if "labels" not in batch:
        raise SliceInitError(
            f"batch has no 'labels' (keys {sorted(batch)}); add labels so model(**batch) returns "
            f"a loss, or pass loss_fn(model, batch) -> loss"
        )


def _positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


class BatchStream:
    """One source of batches: ``steps`` batches, each weighted ``weight`` (its share of the average)."""

    def __init__(self, batches: Iterable, steps: int, weight: float, label: str):
        if isinstance(batches, Mapping) or isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
            raise SliceInitError(
                f"{label}: expected an iterable of batches (a list, a DataLoader, a generator), "
                f"got {type(batches).__name__}"
            )
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise SliceInitError(f"{label}: steps={steps!r} must be a positive integer")
        try:
            n = len(batches)  # fail before any forward pass when the length is known
        except TypeError:  # no length: a generator, or a DataLoader over an IterableDataset (streaming)
            n = None
        if n is not None:
            if n < steps:
                raise SliceInitError(
                    f"{label}: needs {steps} batches but has only {n}; pass more batches or "
                    f"lower the steps (SliceConfig.current_steps / replay_steps)"
                )
        self.batches, self.steps, self.weight, self.label = batches, steps, weight, label


def _gradient_context(model: nn.Module, targets: Mapping[str, nn.Module], train_mode: bool):
    """Freeze every parameter but the target weights; returns an undo function."""
    saved_rg = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    target_weights = {id(m.weight) for m in targets.values()}

    def undo():
        for p, rg in saved_rg:
            p.requires_grad_(rg)
        model.train(was_training)

    for p, _ in saved_rg:
        p.requires_grad_(id(p) in target_weights)
    model.train(train_mode)
    return undo


def collect_streams(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    streams: list[BatchStream],
    loss_fn: LossFn | None = None,
    *,
    offload: bool = False,
    progress: bool = False,
    train_mode: bool = False,
    source: str = "gradient",
) -> dict[str, torch.Tensor]:
    """Σ over streams of weight · Σ_s ∇L(batch_s), one float32 accumulator per target, keyed by name in
    (out, in) orientation. Averaged across ranks when torch.distributed is initialized.

    FSDP2-sharded targets (DTensor weights): each rank accumulates only its own shard of each gradient (FSDP's
    reduce-scatter has already averaged it over the ranks) and gets back its shard in (out, in) orientation (rows
    of W for a Linear, columns for a Conv1D); the ranks agree before every forward and backward, so a rank that
    runs out of batches or whose loss is refused stops every rank instead of leaving them waiting."""
    loss_fn = loss_fn or default_loss
    sharded = any(is_dtensor(m.weight) for m in targets.values())
    device = _model_device(targets)
    acc_device = torch.device("cpu") if offload else device
    pin = offload and device.type == "cuda"
    # Accumulate in the parameter's own layout (no transposed add for Conv1D); transposed once at the end.
    acc = {
        n: torch.zeros(local(m.weight).shape, dtype=torch.float32, device=acc_device, pin_memory=pin)
        for n, m in targets.items()
    }
    alpha = {"value": 0.0}
    # The backend is chosen here, once, in the caller's thread: per call it cost more than the kernel (see
    # ``accumulator``), and on CUDA the hooks run in autograd's device thread, which does not see a
    # ``use_backend`` block entered by the caller.
    add = accumulator(acc_device)

    def make_hook(names):
        def hook(p):
            g = p.grad
            if g is not None:
                g = local(g)  # a sharded weight's .grad is a DTensor: its local piece is this rank's shard
                g = g if g.device == acc_device else g.to(acc_device)
                for name in names:
                    add(acc[name], g, alpha["value"])
            p.grad = None  # released at once: only the layer autograd is finishing holds a .grad

        return hook

    # One hook per distinct parameter: modules sharing a weight would otherwise see it consumed by the first.
    sharing: dict[int, list[str]] = {}
    for n, m in targets.items():
        sharing.setdefault(id(m.weight), []).append(n)

    undo = _gradient_context(model, targets, train_mode)
    handles = []
    error = None
    try:
        for names in sharing.values():
            w = targets[names[0]].weight
            w.grad = None
            handles.append(w.register_post_accumulate_grad_hook(make_hook(names)))
        total = sum(s.steps for s in streams)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc=f"collecting {source}s", unit="batch")
        for st in streams:
            alpha["value"] = st.weight / st.steps
            got = 0
            for batch in _stream_batches(st, sharded, loss_fn):
                with torch.enable_grad():
                    if sharded:  # FSDP's backward is collective: every rank must have a valid loss first
                        loss, err = None, None
                        try:
                            loss = _checked_loss(loss_fn, model, _to_device(batch, device), st.label)
                        except Exception as e:
                            err = e
                        distributed.agree(err, f"{st.label}: the loss")
                    else:
                        loss = _checked_loss(loss_fn, model, _to_device(batch, device), st.label)
                    loss.backward()
                got += 1
                if bar is not None:
                    bar.update(1)
            if got < st.steps:
                raise SliceInitError(
                    f"{st.label}: needs {st.steps} batches but the iterable gave only {got}; "
                    f"pass more batches or lower the steps"
                )
        if bar is not None:
            bar.close()
    except Exception as e:
        if not distributed.active() or sharded:  # sharded ranks already agreed on every failure above
            raise
        error = e  # replicated ranks: say so to every rank before the all-reduce, which would wait for this one
    finally:
        for h in handles:
            h.remove()
        for m in targets.values():
            m.weight.grad = None
        undo()
    if not sharded:
        distributed.agree(error, f"collecting the {source}")
        distributed.average_(list(acc.values()))
    out = {}
    bad = None
    for n in list(acc):
        a = acc.pop(n)
        if is_conv1d(targets[n]):
            a = a.T.contiguous()
        if bad is None and not all_finite(a):
            bad = NonFiniteGradientError(n, source)
            if not sharded:
                raise bad
        out[n] = a
    if sharded:
        distributed.agree(bad, f"checking the {source} (a shard of it is non-finite)")
    return out


def _checked_loss(loss_fn: LossFn, model: nn.Module, batch, label: str) -> torch.Tensor:
    loss = loss_fn(model, batch)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise SliceInitError(
            f"{label}: the loss must be a scalar tensor, got {type(loss).__name__} {tuple(getattr(loss, 'shape', ()))}"
        )
    if not loss.requires_grad:
        raise SliceInitError(
            f"{label}: the loss does not depend on the target weights "
            f"(no grad); check target_modules and loss_fn (with reentrant "
            f"gradient checkpointing, call model.enable_input_require_grads())"
        )
    return loss


def _stream_batches(st: BatchStream, sharded: bool, loss_fn: LossFn):
    """The stream's first ``steps`` batches. Sharded: the ranks agree before each forward pass (FSDP's all-gathers
    would wait for a rank that has no batch, or whose batch the default loss refuses, forever)."""
    if not sharded:
        yield from itertools.islice(iter(st.batches), st.steps)
        return
    it = iter(st.batches)
    for _ in range(st.steps):
        batch, err = None, None
        try:
            batch = next(it)
            if loss_fn is default_loss:
                check_default_batch(batch)
        except StopIteration:
            err = SliceInitError(
                f"{st.label}: needs {st.steps} batches but the iterable ended early on this rank; give every rank "
                f"at least that many batches or lower the steps"
            )
        except Exception as e:
            err = e
        distributed.agree(err, f"{st.label}: fetching a batch")
        yield batch


def collect_gradients(
    model: nn.Module,
    target_modules,
    batches: Iterable,
    steps: int,
    loss_fn: LossFn | None = None,
    *,
    offload: bool = False,
    progress: bool = False,
    train_mode: bool = False,
    data_collator=None,
    batch_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Average gradient of the target weights over ``steps`` batches (SPEC §1 step 1).

    Args:
        model: a torch module (a transformers model, or any module with Linear/Conv1D layers).
        target_modules: names (exact or dotted suffix, like PEFT), a regex string (full match), or the
            ``dict`` returned by ``resolve_targets``.
        batches: an iterable of batches; the first ``steps`` are used. A batch is a dict for ``model(**batch)``
            with ``labels`` (tensors are moved to the model's device), or anything ``loss_fn`` accepts. Or
            tokenized examples (a ``datasets.Dataset``, a list of ``{"input_ids": [...], ...}``) with
            ``data_collator`` and ``batch_size`` (``slice_init.batches``).
        steps: how many batches to average (S_cur).
        loss_fn: ``loss_fn(model, batch) -> scalar loss``; default ``model(**batch).loss``.
        offload: keep the float32 accumulators in CPU memory (pinned when the model is on CUDA).
        progress: show a tqdm progress bar.
        train_mode: run in train mode (dropout on, as PEFT's LoRA-GA); default eval mode (see module doc).
        data_collator: collates tokenized examples into a batch (e.g. transformers'
            ``DataCollatorForLanguageModeling(tokenizer, mlm=False)``); used only when ``batches`` holds examples.
        batch_size: examples per batch for ``data_collator``.

    Returns:
        name (from ``model.named_modules()``) -> float32 gradient in (out, in) orientation (Conv1D transposed),
        on the model's device, or on CPU with ``offload``. With torch.distributed initialized, the average
        over all ranks' batches. FSDP2-sharded targets: this rank's shard of each, in (out, in) orientation (rows of W
        for a Linear, columns for a Conv1D; ``collect_streams``).
    """
    refuse_wrapped_model(model, "collect_gradients")  # DDP's reducer would hang (slice_kernels/wrappers.py)
    targets = resolve_targets(model, target_modules)
    batches, label = as_batches(
        batches,
        "batches",
        data_collator=data_collator,
        batch_size=batch_size,
        needs_labels=loss_fn is None or loss_fn is default_loss,
        steps=steps if _positive_int(steps) else None,
    )
    stream = BatchStream(batches, steps, 1.0, label)
    return collect_streams(
        model,
        targets,
        [stream],
        loss_fn,
        offload=offload,
        progress=progress,
        train_mode=train_mode,
        source="current-task gradient",
    )


def collect_replay_gradients(
    model: nn.Module,
    target_modules,
    replay,
    steps: int,
    mode: str = "per_task",
    loss_fn: LossFn | None = None,
    *,
    offload: bool = False,
    progress: bool = False,
    train_mode: bool = False,
    batch_size: int | None = None,
    last_task_only: bool = False,
    data_collator=None,
    example_batch_size: int | None = None,
) -> dict[str, torch.Tensor] | None:
    """G_prev (SPEC §1 step 2). ``mode="per_task"``: ``replay`` is a list with one iterable of batches per
    earlier task; each task's ``steps`` batches are averaged and the tasks weighted equally,
    (1/(t−1)) Σ_k mean_s ∇L. ``mode="pooled"``: ``replay`` is one iterable of batches (all earlier tasks
    mixed), averaged over ``steps`` batches. ``replay=None`` or an empty list (task 1) gives None.

    ``batch_size`` (``SliceConfig.retain_batch_size``): regroup the rows of each stream into batches of exactly
    this many examples before averaging ``steps`` of them (``Rebatched``); None uses the batches as given.
    ``last_task_only`` (``SliceConfig.single_retain_task_mode``, per-task mode): replay only the last entry of
    ``replay``, the most recent earlier task. A source of tokenized examples (a ``datasets.Dataset``, a list of
    ``{"input_ids": [...]}``) is collated by ``data_collator`` into batches of ``batch_size`` examples (of
    ``example_batch_size`` when ``batch_size`` is None)."""
    if replay is None:
        return None
    refuse_wrapped_model(model, "collect_replay_gradients")
    targets = resolve_targets(model, target_modules)
    streams = replay_streams(
        replay,
        steps,
        mode,
        batch_size=batch_size,
        last_task_only=last_task_only,
        data_collator=data_collator,
        example_batch_size=example_batch_size,
        needs_labels=loss_fn is None or loss_fn is default_loss,
    )
    if not streams:
        return None
    return collect_streams(
        model,
        targets,
        streams,
        loss_fn,
        offload=offload,
        progress=progress,
        train_mode=train_mode,
        source="replay gradient",
    )


def replay_streams(
    replay,
    steps: int,
    mode: str,
    *,
    batch_size: int | None = None,
    last_task_only: bool = False,
    data_collator=None,
    example_batch_size: int | None = None,
    needs_labels: bool = False,
) -> list[BatchStream]:
    """Validate ``replay`` against ``mode`` and split it into weighted streams (no batch is consumed);
    ``batch_size`` re-batches every stream, ``last_task_only`` keeps the last per-task entry only.

    A stream of tokenized examples is collated by ``data_collator`` into batches of ``batch_size`` examples, or of
    ``example_batch_size`` when ``batch_size`` is None (``slice_init.batches``). ``needs_labels``: the default loss
    will read the batches, so they must carry labels (checked here where the batches can be seen)."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise SliceInitError(f"replay batch_size={batch_size!r} must be a positive integer or None")
    if last_task_only and mode != "per_task":
        raise SliceInitError("last_task_only (single_retain_task_mode) needs replay_mode='per_task'")

    def stream(x, weight: float, label: str) -> BatchStream:
        shown = steps if _positive_int(steps) else None
        if looks_like_examples(x):  # collated straight at the replay batch size: no re-batching needed
            size = batch_size if batch_size is not None else example_batch_size
            x, label = as_batches(
                x, label, data_collator=data_collator, batch_size=size, needs_labels=needs_labels, steps=shown
            )
            return BatchStream(x, steps, weight, label)
        x, label = as_batches(x, label, needs_labels=needs_labels, steps=shown)
        if batch_size is not None:
            x, label = Rebatched(x, batch_size, label), f"{label} (re-batched to retain_batch_size={batch_size})"
        return BatchStream(x, steps, weight, label)

    if isinstance(replay, Mapping) or not isinstance(replay, Iterable):
        raise SliceInitError(
            f"replay must be a list of iterables (one per earlier task) or, with "
            f"replay_mode='pooled', one iterable of batches; got {type(replay).__name__}"
        )
    if mode not in ("per_task", "pooled"):
        raise SliceInitError(f"replay_mode={mode!r} is not 'per_task' or 'pooled'")
    if isinstance(replay, (list, tuple)) and len(replay) == 0:
        return []  # no earlier task (task 1), whatever the mode
    if mode == "pooled":
        if isinstance(replay, (list, tuple)) and all(_is_batch_source(x) for x in replay):
            raise SliceInitError(
                f"replay_mode='pooled' takes ONE iterable of batches (all earlier tasks mixed), but replay is a "
                f"list of {len(replay)} iterables; chain/shuffle them into one stream, or use "
                f"replay_mode='per_task' to weight the tasks equally"
            )
        return [stream(replay, 1.0, "pooled replay")]
    if not isinstance(replay, (list, tuple)):
        raise SliceInitError(
            "replay_mode='per_task' needs a list with one iterable of batches per earlier task; "
            f"got {type(replay).__name__} (for one mixed stream use replay_mode='pooled')"
        )
    if replay and not all(_is_batch_source(x) for x in replay):
        if is_tokenizer_output(replay[0]):
            refuse_raw(replay[0], "replay task 0")
        if is_example(replay[0]):
            raise SliceInitError(
                "replay_mode='per_task' needs a list of per-task sources, but its items look like tokenized examples; "
                "wrap one task's examples as [examples] (with data_collator=... and batch_size=...), or use "
                "replay_mode='pooled' for one mixed stream"
            )
        raise SliceInitError(
            "replay_mode='per_task' needs a list of per-task iterables, but its items look like batches; wrap "
            "one task's batches as [batches], or use replay_mode='pooled' for one mixed stream"
        )
    tasks = list(enumerate(replay))
    if last_task_only:
        tasks = tasks[-1:]  # the most recent earlier task (the list is oldest first)
    k = len(tasks)
    return [stream(x, 1.0 / k, f"replay task {i}") for i, x in tasks]


def _rows(batch, label: str) -> int:
    """The leading (batch) dimension shared by every tensor of a dict batch."""
    if not isinstance(batch, Mapping) or not batch:
        raise SliceInitError(
            f"{label}: retain_batch_size re-batches dict batches of tensors (model(**batch)), got "
            f"{type(batch).__name__}; form the batches at the size you want and leave retain_batch_size=None"
        )
    sizes = set()
    for k, v in batch.items():
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            raise SliceInitError(
                f"{label}: retain_batch_size re-batches tensors with a leading batch dimension, but batch key "
                f"{k!r} is {type(v).__name__}{' (0-d)' if isinstance(v, torch.Tensor) else ''}; leave "
                f"retain_batch_size=None and form the batches yourself"
            )
        sizes.add(int(v.shape[0]))
    if len(sizes) != 1:
        raise SliceInitError(f"{label}: the batch's tensors disagree on the batch dimension ({sorted(sizes)})")
    return sizes.pop()


# padding of rows of unequal length when re-batching: ignored labels, masked attention, token/other id 0
_PAD = {"labels": -100, "attention_mask": 0}


def _concat(pieces: list[dict]) -> dict:
    if len(pieces) == 1:
        return dict(pieces[0])
    keys = list(pieces[0])
    if any(set(p) != set(keys) for p in pieces):  # the same keys in another order are the same batch layout
        raise SliceInitError(
            f"re-batching replay batches with different keys: {[sorted(p) for p in pieces]}; every replay batch "
            f"must carry the same keys (e.g. input_ids, attention_mask, labels)"
        )
    out = {}
    for k in keys:
        ts = [p[k] for p in pieces]
        ranks = sorted({t.dim() for t in ts})
        if len(ranks) > 1:
            raise SliceInitError(
                f"re-batching replay batches: key {k!r} has tensors of different ranks {ranks} (e.g. (batch,) beside "
                f"(batch, seq)); give every batch the same layout, or leave retain_batch_size=None"
            )
        if ts[0].dim() > 1 and any(t.shape[1:] != ts[0].shape[1:] for t in ts):
            full = [max(t.shape[d] for t in ts) for d in range(1, ts[0].dim())]
            padded = []
            for t in ts:
                pad = []
                for d in reversed(range(1, t.dim())):  # F.pad: last dimension first, (left, right) each
                    pad += [0, full[d - 1] - t.shape[d]]
                padded.append(torch.nn.functional.pad(t, pad, value=_PAD.get(k, 0)))
            ts = padded
        out[k] = torch.cat(ts, 0)
    return out


class Rebatched:
    """The rows of an iterable of dict batches, in order, regrouped into batches of exactly ``batch_size`` rows
    (``SliceConfig.retain_batch_size``: the replay batch size, separate from the count ``replay_steps``). A
    trailing partial batch is dropped. Rows of unequal length are right-padded (``labels`` −100,
    ``attention_mask`` 0, any other tensor 0), which leaves a causal LM's loss on the real tokens unchanged.
    Has a length (full batches) when the source is a list or tuple, so a short source is refused before any
    forward pass."""

    def __init__(self, batches: Iterable, batch_size: int, label: str):
        if isinstance(batches, Mapping) or isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
            raise SliceInitError(f"{label}: expected an iterable of batches, got {type(batches).__name__}")
        self.batches, self.batch_size, self.label = batches, batch_size, label

    def __len__(self) -> int:
        if not isinstance(self.batches, (list, tuple)):
            raise TypeError("a re-batched stream has a length only over a list or tuple of batches")
        return sum(_rows(b, self.label) for b in self.batches) // self.batch_size

    def __iter__(self):
        pending, count = [], 0
        for b in self.batches:
            rows = _rows(b, self.label)
            start = 0
            while start < rows:
                take = min(self.batch_size - count, rows - start)
                pending.append({k: v[start : start + take] for k, v in b.items()})
                count += take
                start += take
                if count == self.batch_size:
                    yield _concat(pending)
                    pending, count = [], 0


def _is_batch_source(x) -> bool:
    # A tuple of tensors is one batch in the (inputs, targets) convention of a custom loss_fn, not a source.
    if isinstance(x, tuple) and len(x) > 0 and all(isinstance(v, torch.Tensor) for v in x):
        return False
    return isinstance(x, Iterable) and not isinstance(x, (Mapping, str, bytes, torch.Tensor))
