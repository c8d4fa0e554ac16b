"""LightningDataModule: records → tokenized examples → resumable, rank-sharded batches."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
from torch.utils.data import DataLoader, Dataset

from ..data.batching import Batching, ResumableBatchSampler
from ..data.collate import PackedCollator, PaddedCollator
from ..data.records import (
    DataQualityError,
    RecordError,
    RecordReport,
    read_conversations,
)
from ..data.tokenize import ConversationTokenizer, Example


class ExampleDataset(Dataset):
    """Tokenized examples held in memory (tokenizing once up front also lets the run report skips early).

    An index is one example; a list of indices is one packed row (the packed batch sampler yields rows).
    """

    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int | Sequence[int]) -> Example | list[Example]:
        if isinstance(index, Sequence):
            return [self.examples[i] for i in index]
        return self.examples[index]


class SFTDataModule(L.LightningDataModule):
    """Training and validation batches from ProteinLMDataset-format files.

    Args:
        train_path / val_path: local .json/.jsonl/.parquet files or a hub dataset id (`hub_name`, `hub_split`).
        tokenizer: a `ConversationTokenizer` (multimodal or text-only, sft or caption).
        pad_token_id / processor: for the collator.
        batch_size: micro-batch per device (examples, or packed rows with batching="packed").
        batching: "random", "length_grouped" or "packed" (several samples per row, `pack_length` tokens).
        seed: data order. strict: stop at the first bad record.
        limit: read at most this many usable records (quick runs).
        swapped_copy: each batch also carries a copy with the proteins swapped (`swapped_*` keys), for
            the swap-contrast loss.
    """

    def __init__(
        self,
        train_path: str,
        tokenizer: ConversationTokenizer,
        pad_token_id: int,
        processor=None,
        val_path: str | None = None,
        batch_size: int = 4,
        seed: int = 0,
        strict: bool = False,
        limit: int | None = None,
        hub_name: str | None = None,
        hub_split: str = "train",
        num_workers: int = 0,
        batching: Batching = "random",
        pack_length: int | None = None,
        representation_cache=None,
        swapped_copy: bool = False,
    ):
        super().__init__()
        self.train_path, self.val_path = train_path, val_path
        self.tokenizer = tokenizer
        self.batching, self.pack_length = batching, pack_length
        if batching == "packed":
            if pack_length is None:
                raise ValueError("batching=packed needs pack_length")
            if swapped_copy:
                raise ValueError("the swap-contrast loss (a swapped copy of each batch) needs padded batches, not batching=packed")
            self.collator = PackedCollator(pad_token_id, pack_length, processor, representation_cache=representation_cache)
        else:
            self.collator = PaddedCollator(pad_token_id, processor, representation_cache=representation_cache, swapped_copy=swapped_copy)
        self.batch_size, self.seed, self.limit = batch_size, seed, limit
        self.hub_name, self.hub_split = hub_name, hub_split
        self.num_workers = num_workers
        self.report = RecordReport(strict=strict)
        self.val_report = RecordReport(strict=strict)
        self.train_dataset: ExampleDataset | None = None
        self.val_dataset: ExampleDataset | None = None
        self.sampler: ResumableBatchSampler | None = None
        self._resume_state: dict | None = None

    def _examples(self, path: str, report: RecordReport) -> list[Example]:
        conversations = read_conversations(path, report, limit=self.limit, name=self.hub_name, split=self.hub_split)
        examples = []
        for conversation in conversations:
            try:
                example = self.tokenizer(conversation)
            except RecordError as error:
                report.reject_kept(error)
                continue
            if example.truncated:
                report.record_note("truncated", f"{example.record_id}: cut to {len(example.input_ids)} tokens")
            examples.append(example)
        if not examples:
            raise DataQualityError(f"no usable examples in {path}:\n{report.summary()}")
        return examples

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is None:
            self.train_dataset = ExampleDataset(self._examples(self.train_path, self.report))
        if self.val_path and self.val_dataset is None:
            self.val_dataset = ExampleDataset(self._examples(self.val_path, self.val_report))

    def training_proteins(self) -> set[str]:
        """Every protein of the training examples (not the validation ones)."""
        return {p for example in self.train_dataset.examples for p in example.proteins}

    def proteins(self) -> set[str]:
        """Every protein of the training and validation examples (to fill a representation cache)."""
        datasets = [d for d in (self.train_dataset, self.val_dataset) if d is not None]
        return {p for dataset in datasets for example in dataset.examples for p in example.proteins}

    def _batch_sampler(self, dataset: ExampleDataset, shuffle: bool) -> ResumableBatchSampler:
        return ResumableBatchSampler(
            [len(e.input_ids) for e in dataset.examples],
            self.batch_size,
            seed=self.seed,
            mode=self.batching,
            shuffle=shuffle,
            pack_length=self.pack_length,
            rank=self.trainer.global_rank if self.trainer is not None else 0,
            world_size=self.trainer.world_size if self.trainer is not None else 1,
        )

    def train_dataloader(self) -> DataLoader:
        self.sampler = self._batch_sampler(self.train_dataset, shuffle=True)
        if self._resume_state is not None:
            self.sampler.resume_from(self._resume_state["epoch"], self._resume_state["batches_done"])
            self._resume_state = None
        return DataLoader(
            self.train_dataset, batch_sampler=self.sampler, collate_fn=self.collator, num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            return []
        sampler = self._batch_sampler(self.val_dataset, shuffle=False)
        return DataLoader(self.val_dataset, batch_sampler=sampler, collate_fn=self.collator)

    # --- the data position travels in Lightning checkpoints (LightningDataModule state is saved with them)
    def state_dict(self) -> dict:
        if self.trainer is None:
            return {}
        # ModelCheckpoint saves from on_train_batch_end, after the batch is processed but before Lightning
        # marks it completed: `processed` counts the batches this epoch has consumed, the current one included.
        batches_done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": self.trainer.current_epoch, "batches_done": batches_done}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            self._resume_state = dict(state_dict)
