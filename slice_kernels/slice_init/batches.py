"""What gradient collection accepts as a source of batches, and the adapters that turn the other usual forms
into one.

Collection reads collated batches (dicts of tensors for ``model(**batch)``). Users of transformers usually hold
something else: a ``datasets.Dataset`` after ``.map(tokenizer)``, or a list of tokenized examples
(``{"input_ids": [...]}``), plus the data collator their Trainer would use. ``as_batches`` recognizes:

* a ``torch.utils.data.DataLoader``: used as it is (it collates itself);
* a list/tuple of collated batches: used as it is, each checked for ``labels`` up front when the default loss
  needs them;
* a ``datasets.Dataset`` (or ``IterableDataset``) or a list/tuple of tokenized examples: batched by
  ``data_collator`` into ``batch_size`` examples per batch, in order (a ``DataLoader`` with ``shuffle=False``,
  ``drop_last=True``: every averaged batch has the same size). The first batch is collated once here so a
  collator without labels, or one that fails, is reported before any forward pass;
* any other iterable (a generator, a streaming loader): used as it is, checked batch by batch.

Every refusal names the missing piece (the collator, the batch size, tokenization, labels) and what to pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from ..errors import SliceInitError

LM_COLLATOR_HINT = (
    "DataCollatorForLanguageModeling(tokenizer, mlm=False) (labels = input_ids, padding -100) or "
    "DataCollatorForSeq2Seq(tokenizer) with labels in the examples"
)


def is_hf_dataset(x) -> bool:
    """A ``datasets.Dataset``/``IterableDataset``, recognized without importing ``datasets``."""
    return type(x).__module__.split(".")[0] == "datasets" and hasattr(x, "column_names")


def _is_token_list(v) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in v[:8])


def is_example(item) -> bool:
    """One tokenized example: a dict whose ``input_ids`` is a list of ints or a 1-D tensor (a collated batch holds
    a (batch, seq) tensor there)."""
    if not isinstance(item, Mapping) or "input_ids" not in item:
        return False
    ids = item["input_ids"]
    return _is_token_list(ids) or (isinstance(ids, torch.Tensor) and ids.dim() == 1)


def _string_keys(item: Mapping) -> list[str]:
    return [
        k
        for k, v in item.items()
        if isinstance(v, str) or (isinstance(v, (list, tuple)) and v and isinstance(v[0], str))
    ]


def _dataset_string_columns(ds) -> list[str]:
    features = getattr(ds, "features", None) or {}
    out = []
    for name, feat in features.items():
        text = repr(feat)
        if "'string'" in text or "'large_string'" in text:
            out.append(name)
    return out


def looks_like_examples(source) -> bool:
    """A source that must be collated first: a ``datasets`` dataset or a list/tuple of tokenized examples."""
    if is_hf_dataset(source):
        return True
    return isinstance(source, (list, tuple)) and len(source) > 0 and is_example(source[0])


def is_tokenizer_output(x) -> bool:
    """``tokenizer(list_of_texts)`` without ``return_tensors``: one dict whose ``input_ids`` is a list of lists."""
    ids = x.get("input_ids") if isinstance(x, Mapping) else None
    return isinstance(ids, (list, tuple)) and len(ids) > 0 and isinstance(ids[0], (list, tuple))


def refuse_raw(source, label: str) -> None:
    """Raise the error ``as_batches`` gives for sources that cannot be collated at all: text that is not tokenized, a tokenizer's column output."""
    if isinstance(source, Mapping):
        ids = source.get("input_ids")
        hint = ""
        if is_tokenizer_output(source):
            hint = (
                "; this looks like tokenizer(list_of_texts) output (a dict of lists): make it "
                "datasets.Dataset.from_dict(dict(encoding)) and pass data_collator=... and batch_size=..."
            )
        elif is_hf_dataset(source):  # a DatasetDict (load_dataset without split=) is a dict of splits
            hint = f"; it holds the splits {sorted(source)}: pass one, e.g. dataset[{next(iter(source), 'train')!r}]"
        elif isinstance(ids, torch.Tensor) and ids.dim() == 2:
            hint = "; this looks like one collated batch: pass a list of batches, e.g. [batch]"
        raise SliceInitError(
            f"{label}: expected an iterable of batches (a list, a DataLoader, a generator) or of tokenized examples, "
            f"got {type(source).__name__}{hint}"
        )
    if is_hf_dataset(source):
        strings = _dataset_string_columns(source)
        if strings:
            what = "tokenize first: dataset.map(lambda b: tokenizer(b['text']), batched=True), then "
            if "input_ids" in (source.column_names or []):
                what = ""
            raise SliceInitError(
                f"{label}: the dataset has string column(s) {strings}, which a data collator cannot turn into "
                f"tensors; {what}drop them: dataset.remove_columns({strings})"
            )
        return
    if isinstance(source, (list, tuple)) and source and isinstance(source[0], Mapping) and not is_example(source[0]):
        strings = _string_keys(source[0])
        if strings and not any(isinstance(v, torch.Tensor) for v in source[0].values()):
            raise SliceInitError(
                f"{label}: the examples hold text (key(s) {strings}), not token ids: tokenize first, e.g. "
                f"[tokenizer(x['text']) for x in examples], and pass data_collator=... and batch_size=..."
            )


def _check_batch(batch, label: str, needs_labels: bool, where: str) -> None:
    if not isinstance(batch, Mapping):
        if needs_labels:
            raise SliceInitError(
                f"{label}: {where} is a {type(batch).__name__}, not a dict for model(**batch); return dicts of "
                f"tensors, or pass loss_fn(model, batch) -> loss"
            )
        return
    if needs_labels and "labels" not in batch:
        raise SliceInitError(
            f"{label}: {where} has no 'labels' (keys {sorted(map(str, batch))}), so model(**batch) returns no loss; "
            f"add labels (for a causal LM: labels = input_ids, padding set to -100), or pass "
            f"loss_fn(model, batch) -> loss"
        )


def _collate_check(collator, examples: list, label: str, needs_labels: bool) -> None:
    try:
        batch = collator(examples)
    except Exception as exc:
        raise SliceInitError(
            f"{label}: data_collator failed on the first {len(examples)} examples: {type(exc).__name__}: {exc}. "
            f"Pass a collator that pads tokenized examples into tensors, e.g. {LM_COLLATOR_HINT}"
        ) from exc
    if not isinstance(batch, Mapping):
        raise SliceInitError(
            f"{label}: data_collator returned a {type(batch).__name__}, not a dict of tensors for model(**batch); "
            f"use e.g. {LM_COLLATOR_HINT}"
        )
    lists = [k for k, v in batch.items() if isinstance(v, (list, tuple))]
    if lists:
        raise SliceInitError(
            f"{label}: data_collator returned lists, not tensors, for {lists}: use a collator that returns tensors "
            f"(transformers collators do with return_tensors='pt', their default)"
        )
    if needs_labels and "labels" not in batch:
        raise SliceInitError(
            f"{label}: data_collator's batches have no 'labels' (keys {sorted(map(str, batch))}), so model(**batch) "
            f"returns no loss; DataCollatorWithPadding adds none. Use {LM_COLLATOR_HINT}, or pass "
            f"loss_fn(model, batch) -> loss"
        )


class CollatedExamples(torch.utils.data.DataLoader):
    """Tokenized examples (a ``datasets`` dataset or a list) collated in order into batches of ``batch_size``; a
    trailing partial batch is dropped. A ``DataLoader`` so it has a length when the examples do."""

    def __init__(self, examples, data_collator, batch_size: int):
        super().__init__(examples, batch_size=batch_size, shuffle=False, drop_last=True, collate_fn=data_collator)
        try:
            self.n_examples = len(examples)
        except TypeError:  # a streaming dataset
            self.n_examples = None


def as_batches(
    source,
    label: str,
    *,
    data_collator=None,
    batch_size: int | None = None,
    needs_labels: bool = True,
    steps: int | None = None,
) -> tuple[Iterable, str]:
    """``source`` as an iterable of collated batches, with the label to report it by (see the module doc).

    Examples (a ``datasets`` dataset or a list of tokenized examples) are collated by ``data_collator`` into
    ``batch_size`` examples per batch; collated sources are returned as they are. ``needs_labels``: the default
    loss is used, so batches must carry ``labels``. ``steps``: how many batches will be read (the labels of a
    list of batches are checked for those). Nothing is consumed but the first ``batch_size`` examples, which are
    collated once to check the collator."""
    refuse_raw(source, label)
    if not looks_like_examples(source):
        if isinstance(source, (list, tuple)):
            for i, b in enumerate(source[: steps if steps is not None else len(source)]):
                _check_batch(b, label, needs_labels, f"batch {i}")
        return source, label
    if data_collator is None or batch_size is None:
        missing = " and ".join(
            x for x, v in (("data_collator=...", data_collator), ("batch_size=...", batch_size)) if v is None
        )
        raise SliceInitError(
            f"{label}: these look like tokenized examples (dicts of lists): pass {missing} "
            f"(e.g. {LM_COLLATOR_HINT}), or collate them yourself into dicts of tensors (a DataLoader)"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SliceInitError(f"{label}: batch_size={batch_size!r} must be a positive integer")
    if not callable(data_collator):
        raise SliceInitError(
            f"{label}: data_collator must be callable (list of examples -> batch), got {data_collator!r}"
        )
    first = None
    if isinstance(source, (list, tuple)):
        bad = next((i for i, x in enumerate(source) if not is_example(x)), None)
        if bad is not None:
            raise SliceInitError(
                f"{label}: item {bad} is not a tokenized example like item 0 (a dict with input_ids as a list of "
                f"ints or a 1-D tensor): give one kind of item per source"
            )
        first = list(source[:batch_size])
    elif hasattr(source, "__getitem__") and hasattr(source, "__len__"):  # a map-style datasets.Dataset
        first = [source[i] for i in range(min(batch_size, len(source)))]
    # a streaming dataset is not peeked (that would restart the stream): its first batch is checked when read
    if first:
        _collate_check(data_collator, first, label, needs_labels)
    loader = CollatedExamples(source, data_collator, batch_size)
    if loader.n_examples is not None:
        label = f"{label} ({loader.n_examples} examples in batches of batch_size={batch_size})"
    return loader, label
