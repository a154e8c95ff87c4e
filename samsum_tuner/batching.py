"""Batches: token budgets, samplers and collators, and the attention masks of packed rows.

What SamsumTrainer feeds the model and what the memory planner sizes, from one description (`BatchingSpec`),
with no recipe in sight: api.py makes the spec from the recipe. No transformers at import: the planner reads
token_budget_batches here, and transformers' Trainer stack takes seconds to import (callbacks.BatchSamplerEpoch
sets these samplers' epochs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import IGNORE_INDEX
from .varlen import VARLEN


@dataclass(frozen=True)
class BatchingSpec:
    """How training and evaluation batches are formed, and what they carry."""

    max_tokens_per_batch: int | None  # batches cut by a token budget instead of a row count (None: by rows)
    packing: bool  # padding-free: a batch's samples in one row, position ids restarting per sample
    pad_to_multiple_of: int | None  # rows padded to a multiple of N tokens (packed: with an unsupervised tail)
    longest_first: bool  # the batch with the longest sample trains first: an out-of-memory shows at step 1
    supervised_logits_only: bool  # batches carry their supervised positions (logits_to_keep), the loss only those
    attn_implementation: str  # the recipe's attention kernel, whose packed-row mask is built here (PACKED_MASKS)


def token_budget_batches(lengths: list[int], budget: int, packed: bool, seed: int,
                         multiple: int | None = None) -> list[list[int]]:
    """Sample indices grouped, in a seeded order, into batches whose cost stays within `budget` tokens: the sum
    of lengths when packed, rows x the longest when padded, each row rounded up to `multiple` (pad_to_multiple_of)
    as the collator pads it. The training sampler and the memory planner both use it, so the planner sees the
    batches training will run."""
    m = multiple or 1
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    batches: list[list[int]] = []
    current: list[int] = []
    total = longest = 0
    for i in order:
        n = lengths[i]
        cost = -(-(total + n) // m) * m if packed else (len(current) + 1) * (-(-max(longest, n) // m) * m)
        if current and cost > budget:
            batches.append(current)
            current, total, longest = [], 0, 0
        current.append(i)
        total, longest = total + n, max(longest, n)
    if current:
        batches.append(current)
    return batches


class LongestFirstSampler(torch.utils.data.Sampler):
    """A random order whose first batch is the longest samples: the memory peak comes at step 1."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def __len__(self) -> int:
        return len(self.lengths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        longest = sorted(range(len(self.lengths)), key=lambda i: -self.lengths[i])[: self.batch_size]
        head = set(longest)
        return iter(longest + [i for i in order if i not in head])


class TokenBudgetBatchSampler(torch.utils.data.Sampler):
    """Batches of sample indices whose cost stays within a token budget: the sum of lengths when packed, rows x
    the longest row when padded, rows rounded up to `multiple`. The batches are formed once (from a seeded
    order), so every epoch has the same number of optimizer steps, which the Trainer's schedule, accumulation and
    resume assume; each epoch visits them in a new seeded order, with longest_first the batch holding the longest
    sample first."""

    def __init__(self, lengths: list[int], budget: int, packed: bool, seed: int, longest_first: bool = False,
                 multiple: int | None = None):
        self.lengths, self.seed, self.longest_first, self.epoch = lengths, seed, longest_first, 0
        self.batches = token_budget_batches(lengths, budget, packed, seed, multiple)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + 1 + self.epoch)
        order = torch.randperm(len(self.batches), generator=g).tolist()
        if self.longest_first:
            longest = max(range(len(self.lengths)), key=self.lengths.__getitem__)
            first = next(b for b, batch in enumerate(self.batches) if longest in batch)
            order.remove(first)
            order.insert(0, first)
        return iter([self.batches[b] for b in order])

    def __len__(self) -> int:
        return len(self.batches)


def build_collator(spec: BatchingSpec, tokenizer):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    multiple = spec.pad_to_multiple_of
    if spec.packing:
        # Padding-free: one row, position ids restart per sample; attention stays per sample only
        # because load_model sets use_cache=False.
        flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
        collator = PackedCollator(flatten, tokenizer.pad_token_id, multiple) if multiple else flatten
        return WithSampleBoundaries(collator) if spec.attn_implementation == VARLEN else collator
    # Pads labels with -100 by position, so EOS stays supervised even when pad == eos.
    return DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX, return_tensors="pt",
                                  pad_to_multiple_of=multiple)


class PackedCollator:
    """A packed row padded to a multiple of `multiple` tokens. The tail is one more sample to the model (its
    position ids restart at 0, so the block-diagonal mask keeps it apart), unsupervised and made of the pad id;
    non_padding_tokens leaves it out of the token count."""

    def __init__(self, flatten, pad_token_id: int, multiple: int):
        self.flatten, self.pad_token_id, self.multiple = flatten, pad_token_id, multiple

    def __call__(self, features):
        batch = self.flatten(features)
        n = batch["input_ids"].shape[1]
        tail = -n % self.multiple
        if tail:
            fills = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}
            for key, value in batch.items():
                if key == "position_ids":
                    extra = torch.arange(tail, dtype=value.dtype).unsqueeze(0)
                else:
                    extra = torch.full((1, tail), fills.get(key, 0), dtype=value.dtype)
                batch[key] = torch.cat([value, extra], dim=1)
        return batch


class WithSupervisedPositions:
    """A collator whose batches also carry `logits_to_keep`, the supervised positions, found on the host: on
    the GPU the search (a nonzero) would wait for the GPU to finish the previous step before the host could
    queue anything more."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        batch = self.collator(features)
        if "labels" in batch:
            batch["logits_to_keep"] = supervised_positions(batch["labels"])
        return batch


class WithSampleBoundaries:
    """A packed row's sample boundaries as transformers' variable-length attention takes them (cu_seq_lens_q/k,
    max_length_q/k), found on the host: on the GPU, max_length would be read back at every step."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        batch = self.collator(features)
        return {**batch, **sample_boundaries(batch["position_ids"])}


def sample_boundaries(position_ids: torch.Tensor) -> dict:
    """cu_seq_lens (each sample's first token, then the row's end) and the longest sample of one packed row."""
    if position_ids.shape[0] != 1:
        raise ValueError("sample boundaries are those of one packed row")
    lengths = torch.unique_consecutive(_sample_ids(position_ids)[0], return_counts=True)[1]
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    longest = int(lengths.max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions t whose logits predict a supervised label at t + 1, in any row."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)


def _sample_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Which sample of a packed row each token belongs to: a new one wherever the position does not follow on
    (transformers' own rule, find_packed_sequence_indices)."""
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


FLEX_BLOCK = 128  # create_block_mask's default block size


def _flex_packed_mask(position_ids: torch.Tensor):
    """flex_attention's BlockMask of packed rows, its blocks found from each block's first and last sample id
    (ids never decrease along a row) by a few tensor ops: the same mask create_block_mask gives, with neither
    its compilation (at the first step and at every new shape) nor a dense (q, kv) mask."""
    from torch.nn.attention.flex_attention import BlockMask

    sample = _sample_ids(position_ids)

    def causal_within_sample(b, h, q, kv):
        return (q >= kv) & (sample[b, q] == sample[b, kv])

    rows, length = sample.shape
    n, tail = -(-length // FLEX_BLOCK), -length % FLEX_BLOCK
    ids = torch.cat([sample, sample[:, -1:].expand(rows, tail)], dim=1).view(rows, n, FLEX_BLOCK)
    first, last = ids[..., 0], ids[..., -1]
    i = torch.arange(n, device=sample.device)
    below = i[None, :, None] > i[None, None, :]  # kv block j before q block i
    # Before the diagonal a block is partial where the kv block's last sample reaches the q block's first, and
    # full where one sample spans both blocks (not in a q block that runs past the row's end).
    full = below & (first[:, None, :] == last[:, :, None]) & ~((i == n - 1) & (tail > 0))[None, :, None]
    partial = (below & (last[:, None, :] >= first[:, :, None]) & ~full) | (i[:, None] == i[None, :])[None]

    def ordered(blocks):  # create_block_mask's layout: counts, then the block indices with the used ones first
        blocks = blocks.to(torch.int32)[:, None]
        return blocks.sum(-1, dtype=torch.int32), blocks.argsort(dim=-1, descending=True, stable=True).to(torch.int32)

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=causal_within_sample, seq_lengths=(length, length))


def _sdpa_packed_mask(position_ids: torch.Tensor) -> torch.Tensor:
    sample = _sample_ids(position_ids)
    causal = torch.ones(sample.shape[1], sample.shape[1], dtype=torch.bool, device=sample.device).tril()
    return ((sample[:, :, None] == sample[:, None, :]) & causal)[:, None]  # True: attend


PACKED_MASKS = {"flex_attention": _flex_packed_mask, "sdpa": _sdpa_packed_mask}


def packed_attention_mask(position_ids: torch.Tensor, attn_implementation: str):
    """The attention mask of packed rows, ready for the model (a 4D mask or flex_attention's BlockMask, which
    transformers takes as given): causal, and each token sees only its own sample."""
    return PACKED_MASKS[attn_implementation](position_ids)


def non_padding_tokens(inputs: dict, pad_token_id: int | None) -> torch.Tensor:
    """The Trainer's "non_padding" count of one batch, left on the device: the attention mask's ones; in a packed
    row (no mask) every token but PackedCollator's tail, its last sample when that sample's last label is
    unsupervised (a real sample ends with its supervised EOS, which can be the pad id too); else the input ids
    that are not the pad id."""
    if "attention_mask" in inputs:
        return inputs["attention_mask"].sum()
    ids, positions, labels = inputs["input_ids"], inputs.get("position_ids"), inputs.get("labels")
    if positions is not None and labels is not None and ids.shape[0] == 1:
        tail = torch.where(labels[0, -1] == IGNORE_INDEX, positions[0, -1] + 1, 0)
        return ids.numel() - tail
    return (ids != pad_token_id).sum() if pad_token_id is not None else torch.tensor(ids.numel(), device=ids.device)
