"""Uncontaminated sequence packing: several tokenised samples share one row without seeing each other.

A packed row concatenates whole samples. Three things keep the samples apart:

* ``position_ids`` restart at 0 for every sample, so RoPE restarts and the attention function
  (``lightning_fastft.attention``, or HF's own packed-sequence detection) can find the
  sample boundaries;
* ``cu_seq_lens_q/k`` + ``max_length_q/k`` (HF's ``FlashAttentionKwargs`` names) give the same
  boundaries over the flattened batch, so varlen kernels need no host sync to find them;
* ``labels`` hold -100 on the first token of every sample: HF shifts labels inside the loss, so the
  label at a sample's first token is what the *previous* sample's last token would predict.

A sample is a mapping with ``input_ids`` and optionally ``labels`` (-100 = no loss) or
``loss_mask`` (1 = token is a training target, 0 = prompt). Samples longer than ``max_seq_len``
are truncated with a warning, or cut into independent chunks with ``split_long=True`` (each chunk
starts its own sample: positions restart and it does not see the previous chunk). Empty samples
are skipped.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from lightning_fastft.constants import IGNORE_INDEX



def _as_list(values: Any) -> list[int]:
    return values.tolist() if isinstance(values, torch.Tensor) else list(values)


def sample_labels(sample: Mapping[str, Any]) -> list[int]:
    """The training targets of one sample: its ``labels``, or ``input_ids`` where ``loss_mask`` is 1."""
    input_ids = _as_list(sample["input_ids"])
    if sample.get("labels") is not None:
        labels = _as_list(sample["labels"])
    elif sample.get("loss_mask") is not None:
        labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(input_ids, _as_list(sample["loss_mask"]))]
    else:
        labels = list(input_ids)
    if len(labels) != len(input_ids):
        raise ValueError(f"labels/loss_mask has {len(labels)} entries for {len(input_ids)} input_ids")
    return labels


def _first_fit_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit placement of items (in the given order) into bins of ``capacity``, in O(n log n).

    A max segment tree over the remaining room of n bins (all start empty, so the leftmost bin with
    room is either an open bin or the next fresh one) finds the first bin that fits each item.
    """
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    room = [capacity] * (2 * size)
    bins: list[list[int]] = []
    for item, length in enumerate(lengths):
        node = 1
        while node < size:
            node = 2 * node if room[2 * node] >= length else 2 * node + 1
        leaf = node - size
        if leaf == len(bins):
            bins.append([])
        bins[leaf].append(item)
        room[node] -= length
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return bins


def pack_sequences(
    samples: Iterable[Mapping[str, Any]], max_seq_len: int, *, split_long: bool = False
) -> list[dict[str, list[int]]]:
    """Pack samples into rows of at most ``max_seq_len`` tokens by first-fit-decreasing.

    Samples are placed longest first (ties keep input order) into the first row with room.
    Returns one dict per row with lists ``input_ids``, ``labels`` (-100 on prompts and on each
    sample's first token), ``position_ids`` (restarting at 0 per sample) and ``seq_lens``.
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
    pieces: list[tuple[list[int], list[int]]] = []
    truncated = 0
    for sample in samples:
        input_ids, labels = _as_list(sample["input_ids"]), sample_labels(sample)
        if len(input_ids) > max_seq_len and not split_long:
            truncated += 1
            input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
        for start in range(0, len(input_ids), max_seq_len):
            pieces.append((input_ids[start : start + max_seq_len], labels[start : start + max_seq_len]))
    if truncated:
        warnings.warn(
            f"pack_sequences: truncated {truncated} sample(s) longer than max_seq_len={max_seq_len} "
            "(pass split_long=True to keep their tail as separate samples)",
            stacklevel=2,
        )

    order = sorted(range(len(pieces)), key=lambda i: -len(pieces[i][0]))
    rows = []
    for bin_items in _first_fit_bins([len(pieces[i][0]) for i in order], max_seq_len):
        row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
        for item in bin_items:
            input_ids, labels = pieces[order[item]]
            row["input_ids"] += input_ids
            row["labels"] += [IGNORE_INDEX] + labels[1:]
            row["position_ids"] += list(range(len(input_ids)))
            row["seq_lens"].append(len(input_ids))
        rows.append(row)
    return rows


def pack_dataset(dataset, max_seq_len: int, *, split_long: bool = False):
    """Pack a ``datasets.Dataset`` of samples into a Dataset of rows (see :func:`pack_sequences`).

    Reads ``input_ids`` and ``labels`` or ``loss_mask`` when present (other columns are dropped);
    returns columns ``input_ids``, ``labels``, ``position_ids`` and ``seq_lens``.
    """
    import datasets

    sample_columns = [c for c in ("input_ids", "labels", "loss_mask") if c in dataset.column_names]
    rows = pack_sequences(dataset.select_columns(sample_columns), max_seq_len, split_long=split_long)
    row_columns = ("input_ids", "labels", "position_ids", "seq_lens")
    return datasets.Dataset.from_dict({key: [row[key] for row in rows] for key in row_columns})


def _round_up(value: int, multiple: int) -> int:
    return multiple * math.ceil(value / multiple) if multiple > 1 else value


class PackedCollator:
    """Collate packed rows (from :func:`pack_dataset`/:func:`pack_sequences`) into a padded batch.

    Features that carry ``seq_lens`` are packed rows; otherwise they are raw samples and are packed
    here on the fly into rows of ``max_seq_len``. Rows are right-padded to a common length that is a
    multiple of ``pad_to_multiple_of``; a row's padding forms its own segment with label -100.

    Returns ``input_ids``, ``labels``, ``position_ids`` (B, L) int64; ``cu_seq_lens_q`` =
    ``cu_seq_lens_k`` (int32 boundaries over the flattened B*L tokens, padding included);
    ``max_length_q`` = ``max_length_k`` (int); ``num_real_tokens`` (int, non-padding tokens).
    ``model(**batch)`` passes the varlen keys on to the attention function. There is deliberately no
    ``attention_mask``: with one, HF's own attention would stop treating the rows as packed.

    Samples stay apart only in a model that runs varlen attention for packed batches: one patched by
    ``patch_model`` (``strategy="fastft"``, the ``FastFT`` callback) or switched with
    ``use_varlen_attention``. An unpatched model's own attention may let packed samples see each
    other (HF's sdpa does whenever the forward builds a KV cache, as training with the default
    ``use_cache=True`` does). Empty samples are dropped; a batch without any token raises ``ValueError``.
    """

    def __init__(
        self,
        max_seq_len: int | None = None,
        *,
        pad_token_id: int = 0,
        pad_to_multiple_of: int = 8,
        split_long: bool = False,
    ) -> None:
        self.max_seq_len = max_seq_len
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.split_long = split_long

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if all("seq_lens" in feature for feature in features):
            rows = features
        elif self.max_seq_len is None:
            raise ValueError("PackedCollator needs max_seq_len to pack raw samples (features without seq_lens)")
        else:
            rows = pack_sequences(features, self.max_seq_len, split_long=self.split_long)
        if not any(_as_list(row["input_ids"]) for row in rows):
            raise ValueError(
                f"PackedCollator: no tokens to collate: the batch's {len(features)} sample(s)/row(s) are all "
                "empty (empty samples are dropped when packing); filter empty samples out of the dataset"
            )

        row_len = _round_up(max(len(_as_list(row["input_ids"])) for row in rows), self.pad_to_multiple_of)
        input_ids = torch.full((len(rows), row_len), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), row_len), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.empty((len(rows), row_len), dtype=torch.long)
        segment_lens: list[int] = []
        num_real_tokens = 0
        for r, row in enumerate(rows):
            seq_lens = _as_list(row["seq_lens"])
            used = sum(seq_lens)
            input_ids[r, :used] = torch.as_tensor(_as_list(row["input_ids"]), dtype=torch.long)
            labels[r, :used] = torch.as_tensor(sample_labels(row), dtype=torch.long)
            padding = [row_len - used] if used < row_len else []
            start = 0
            for length in seq_lens + padding:
                position_ids[r, start : start + length] = torch.arange(length)
                labels[r, start] = IGNORE_INDEX
                start += length
            segment_lens += seq_lens + padding
            num_real_tokens += used

        cu_seq_lens = torch.zeros(len(segment_lens) + 1, dtype=torch.int32)
        cu_seq_lens[1:] = torch.tensor(segment_lens).cumsum(0)
        max_length = max(segment_lens)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": max_length,
            "max_length_k": max_length,
            "num_real_tokens": num_real_tokens,
        }


class PaddedCollator:
    """Plain per-batch right padding (one sample per row), for comparison with packing.

    Returns ``input_ids``, ``labels`` (-100 on prompts and padding) and ``attention_mask`` (B, L),
    L the longest sample (truncated to ``max_seq_len`` when given) rounded up to
    ``pad_to_multiple_of``.
    """

    def __init__(self, max_seq_len: int | None = None, *, pad_token_id: int = 0, pad_to_multiple_of: int = 8) -> None:
        self.max_seq_len = max_seq_len
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        limit = self.max_seq_len
        samples = [(_as_list(f["input_ids"])[:limit], sample_labels(f)[:limit]) for f in features]
        row_len = _round_up(max(len(ids) for ids, _ in samples), self.pad_to_multiple_of)
        input_ids = torch.full((len(samples), row_len), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), row_len), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), row_len), dtype=torch.long)
        for r, (ids, sample_targets) in enumerate(samples):
            input_ids[r, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            labels[r, : len(ids)] = torch.as_tensor(sample_targets, dtype=torch.long)
            attention_mask[r, : len(ids)] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def token_utilisation(batches: Iterable[Mapping[str, Any]]) -> float:
    """Share of non-padding tokens over all batches from :class:`PackedCollator`/:class:`PaddedCollator`."""
    real = total = 0
    for batch in batches:
        total += batch["input_ids"].numel()
        real += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["num_real_tokens"]
    return real / total if total else 0.0
