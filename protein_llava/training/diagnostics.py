"""Evidence while training that the protein matters: a Lightning callback logging the interface's health.

A falling loss shows only that the model fits its data; a decoder can fit most of it from the question and
the answer texts alone. Every `every` optimizer steps this callback logs, to the run's logger (the CSV log,
plotted as `diagnostics.png` at the end of the run):

- `diag/nll_true`, `diag/nll_swapped`, `diag/swap_delta_nll`: the mean answer NLL (nats per supervised
  token) on a fixed set of held-out records with their own proteins, and with each protein swapped for
  another of the set (the one next in length). A model that reads the protein has `swap_delta_nll` > 0; a
  model whose answers ignore the protein has ~0.
- `diag/protein_token_rms`, `diag/text_token_rms`: the RMS of the projected protein tokens on those
  proteins and of the decoder's token-embedding matrix (per element). Protein tokens far above the text
  tokens' scale pass through a decoder nearly unchanged.
- `diag/grad_norm_projector`, `diag/grad_norm_llm`, `diag/grad_share_projector`: the gradient norms of the
  projector and of the decoder's trainable weights (LoRA) at that step, and the projector's share of their
  sum: how much of the learning signal reaches the interface.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from collections.abc import Sequence

import lightning as L
import torch

from ..data.collate import PaddedCollator
from ..data.records import Conversation, Turn
from ..constants import IGNORE_INDEX
from ..data.tokenize import ConversationTokenizer
from ..model.loss import chunked_causal_lm_forward
from ..model.modeling import ProteinLLM
from ..sequences import find_seq_spans, format_sequence, normalize_sequence


def swap_proteins(conversations: Sequence[Conversation]) -> list[Conversation]:
    """The same conversations with every protein replaced by the next-longer distinct protein of the set
    (the longest by the shortest): a fixed derangement, so each record is paired with a protein of similar
    length that is not its own."""
    proteins = sorted({p for c in conversations for p in c.proteins}, key=lambda p: (len(p), p))
    if len(proteins) < 2:
        raise ValueError(f"swapping proteins needs at least 2 distinct proteins, found {len(proteins)}")
    replacement = {protein: proteins[(i + 1) % len(proteins)] for i, protein in enumerate(proteins)}

    def rewrite(text: str) -> str:
        pieces, last = [], 0
        for span in find_seq_spans(text):
            pieces += [text[last : span.start], format_sequence(replacement[normalize_sequence(span.inner)])]
            last = span.end
        return "".join(pieces) + text[last:]

    return [
        Conversation(tuple(Turn(t.role, rewrite(t.content)) for t in c.turns), c.record_id + "/swapped", c.notes)
        for c in conversations
    ]


class InterfaceDiagnostics(L.Callback):
    """Logs swap-ΔNLL, protein- vs text-token RMS and the projector's gradient share every `every` steps.

    Args:
        conversations: held-out records with proteins (a fixed set; 16–32 keep it cheap).
        every: optimizer steps between measurements (also at step 0).
        batch_size: records per forward.
    """

    def __init__(self, conversations: Sequence[Conversation], every: int = 20, batch_size: int = 8):
        super().__init__()
        if every < 1:
            raise ValueError(f"diagnostics.every must be >= 1, got {every}")
        self.conversations = [c for c in conversations if c.proteins]
        if len({p for c in self.conversations for p in c.proteins}) < 2:
            raise ValueError("diagnostics need held-out records carrying at least 2 distinct proteins")
        self.every, self.batch_size = every, batch_size
        self.batches: dict[str, list[dict]] = {}
        self.proteins: list[str] = []
        self.processor = None
        self.history: list[dict] = []
        self.last_measured_step: int | None = None

    def bind(self, conversation_tokenizer: ConversationTokenizer, pad_token_id: int, processor=None) -> None:
        """Tokenize the fixed records (own and swapped proteins) with the run's tokenizer; `train()` calls this."""
        collator = PaddedCollator(pad_token_id, processor)
        self.processor = processor
        self.proteins = sorted({p for c in self.conversations for p in c.proteins})
        for name, conversations in (("true", self.conversations), ("swapped", swap_proteins(self.conversations))):
            examples = [conversation_tokenizer(c) for c in conversations]
            self.batches[name] = [
                collator(examples[i : i + self.batch_size]) for i in range(0, len(examples), self.batch_size)
            ]

    # --- measurements
    def _answer_nll(self, model, batches: list[dict], device) -> float:
        total, count = 0.0, 0
        for batch in batches:
            batch = _with_representations(model, batch, device)
            labels = batch.pop("labels")
            num_supervised = int((labels[:, 1:] != IGNORE_INDEX).sum())
            if isinstance(model, ProteinLLM):
                loss = model(**batch, labels=labels, use_cache=False, loss_chunk_size=1024).loss
            else:
                loss = chunked_causal_lm_forward(model, labels, 1024, **batch).loss
            total += float(loss) * num_supervised
            count += num_supervised
        return total / max(count, 1)

    def measure(self, model, device) -> dict[str, float]:
        """The interface's numbers for `model` now (eval mode is the caller's business)."""
        metrics = {}
        # The encoder, the embeddings and the projector are called outside the model's own forward.
        with torch.no_grad(), _root_unsharded(model):
            metrics["diag/nll_true"] = self._answer_nll(model, self.batches["true"], device)
            metrics["diag/nll_swapped"] = self._answer_nll(model, self.batches["swapped"], device)
            metrics["diag/swap_delta_nll"] = metrics["diag/nll_swapped"] - metrics["diag/nll_true"]
            decoder = model.language_model if isinstance(model, ProteinLLM) else model
            embeddings = decoder.get_input_embeddings().weight
            metrics["diag/text_token_rms"] = float(embeddings.float().pow(2).mean().sqrt())
            if isinstance(model, ProteinLLM) and self.processor is not None:
                ids = self.processor.encode_proteins(self.proteins)
                encoder_device = next(model.protein_encoder.parameters()).device
                tokens = model.get_protein_features(ids.to(encoder_device))
                metrics["diag/protein_token_rms"] = float(tokens.float().pow(2).mean().sqrt())
        return metrics

    # --- Lightning hooks
    def _due(self, trainer, step: int) -> bool:
        """Every `every` steps and at the run's last step (a stage shorter than `every` still gets its end)."""
        return step % self.every == 0 or step == trainer.max_steps

    def on_train_start(self, trainer, pl_module):
        if trainer.global_step == 0:
            self._log(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # With gradient accumulation this hook runs once per micro-batch: measure each step once.
        step = trainer.global_step
        if self._due(trainer, step) and step != self.last_measured_step:
            self._log(trainer, pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # global_step counts finished optimizer steps: this step becomes global_step + 1.
        if not self._due(trainer, trainer.global_step + 1) or not isinstance(pl_module.model, ProteinLLM):
            return
        model = pl_module.model
        projector = _grad_norm(model.projector.parameters())
        llm = _grad_norm(model.language_model.parameters())
        share = projector / (projector + llm) if projector + llm > 0 else float("nan")
        metrics = {"diag/grad_norm_projector": projector, "diag/grad_norm_llm": llm, "diag/grad_share_projector": share}
        self.history.append({"step": trainer.global_step + 1, **metrics})
        # Straight to the logger: Lightning's own self.log would keep only every log_every_n_steps-th step.
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step + 1)

    def _log(self, trainer, pl_module) -> None:
        if not self.batches:
            raise RuntimeError("InterfaceDiagnostics was not bound to the run's tokenizer (train() does this)")
        model = pl_module.model
        modes = {name: module.training for name, module in model.named_modules()}
        model.eval()
        try:
            with trainer.precision_plugin.forward_context():
                metrics = self.measure(model, pl_module.device)
        finally:
            for name, module in model.named_modules():
                module.training = modes.get(name, module.training)
        self.last_measured_step = trainer.global_step
        self.history.append({"step": trainer.global_step, **metrics})
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=trainer.global_step)


def _with_representations(model, batch: dict, device) -> dict:
    """The batch on `device`; proteins as encoder representations computed where the encoder lives (with
    the frozen-encoder cache the encoder stays on the CPU while the decoder may sit on a GPU)."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        # Under FSDP the encoder sits on the decoder's device, and its layers must run inside the root's
        # forward (FSDP initialises the root's state on its first forward; a layer called first would claim it).
        return {k: v.to(device) for k, v in batch.items()}
    batch = {k: v.to(device) if k != "protein_input_ids" else v for k, v in batch.items()}
    ids = batch.pop("protein_input_ids", None)
    if ids is not None and isinstance(model, ProteinLLM):
        encoder_device = next(model.protein_encoder.parameters()).device
        representations, mask = model.protein_encoder(ids.to(encoder_device))
        batch["protein_representations"] = representations.to(device)
        batch["protein_representations_mask"] = mask.to(device)
    return batch


@contextmanager
def _root_unsharded(model):
    """Under FSDP (trainer=fsdp) the root unit's parameters (embeddings, projector, LM head, and a training
    encoder's embeddings and final norm) are shards between forwards: gather them for the duration (every rank
    runs the callback, so the all-gather is collective). Units of their own (layers) gather themselves."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def _grad_norm(parameters) -> float:
    """The gradients' global 2-norm; under FSDP each rank holds a slice of each gradient, summed over ranks."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad.detach() for p in parameters if p.requires_grad and p.grad is not None]
    sharded = any(isinstance(g, DTensor) for g in grads)
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    total = sum(float(g.float().pow(2).sum()) for g in local)
    if sharded and torch.distributed.is_initialized():
        summed = torch.tensor(total, dtype=torch.float64, device=local[0].device)
        torch.distributed.all_reduce(summed)
        total = float(summed)
    return math.sqrt(total)


__all__ = ["InterfaceDiagnostics", "swap_proteins"]
