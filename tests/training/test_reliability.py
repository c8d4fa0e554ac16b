"""Non-finite steps, atomic checkpoint writes, and the resumable sampler."""

import lightning as L
import pytest
import torch
from fault_injection import die_halfway_through_a_save
from script_runs import forked_call

from protein_llava import build_tiny
from protein_llava.data.tokenize import ConversationTokenizer
from protein_llava.training.checkpointing import AtomicCheckpointIO, atomic_write
from protein_llava.data.batching import ResumableBatchSampler
from protein_llava.training.datamodule import SFTDataModule
from protein_llava.training.optim import OptimConfig
from protein_llava.training.stage import STAGE1, StageModule, apply_stage_spec


def test_nonfinite_loss_skips_steps_then_stops(tmp_path):
    model, processor = build_tiny()
    with torch.no_grad():
        model.projector.projection[0].weight.fill_(float("nan"))
    datamodule = SFTDataModule(
        str(_tiny_data(tmp_path)), ConversationTokenizer(processor, 256, mode="caption"), pad_token_id=3, processor=processor, batch_size=2
    )
    module = StageModule(apply_stage_spec(model, STAGE1), OptimConfig(total_steps=20, warmup_steps=0, max_nonfinite_in_a_row=3))
    trainer = L.Trainer(max_steps=20, logger=False, enable_checkpointing=False, enable_progress_bar=False, use_distributed_sampler=False)
    with pytest.raises(FloatingPointError, match="3 steps in a row had a non-finite loss"):
        trainer.fit(module, datamodule=datamodule)
    assert module.guard.skipped == 3
    assert torch.isnan(model.projector.projection[0].weight).all()  # no update happened


def test_nonfinite_gradients_drop_the_update(tmp_path):
    model, processor = build_tiny()
    module = StageModule(apply_stage_spec(model, STAGE1), OptimConfig(total_steps=5, warmup_steps=0))
    for parameter in model.projector.parameters():
        parameter.grad = torch.full_like(parameter, float("inf"))
    module.guard.check_gradients(model)
    assert all(p.grad is None for p in model.parameters()) and module.guard.skipped == 1


def test_checkpoint_io_refuses_nonfinite_weights(tmp_path):
    with pytest.raises(FloatingPointError, match="non-finite weights in projector.w"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"projector.w": torch.tensor([1.0, float("nan")])}}, tmp_path / "x.ckpt")
    assert not list(tmp_path.iterdir())


def test_a_crash_during_a_save_leaves_the_previous_file(tmp_path):
    target = tmp_path / "last.ckpt"
    atomic_write(target, lambda tmp: torch.save({"step": 1}, tmp))
    assert forked_call(die_halfway_through_a_save, str(target)) == -9  # SIGKILLed inside atomic_write
    assert torch.load(target, weights_only=True) == {"step": 1}


@pytest.mark.parametrize("mode", ["random", "length_grouped", "packed"])
def test_batch_sampler_resumes_mid_epoch_and_shards_disjointly(mode):
    lengths = [(7 * i) % 23 + 3 for i in range(40)]
    straight = ResumableBatchSampler(lengths, batch_size=3, seed=5, mode=mode, pack_length=40)
    straight.set_epoch(2)
    batches = list(straight)
    assert len(batches) == len(straight) > 3
    resumed = ResumableBatchSampler(lengths, batch_size=3, seed=5, mode=mode, pack_length=40)
    resumed.set_epoch(2)
    resumed.resume_from(epoch=2, batches_done=3)
    assert list(resumed) == batches[3:]
    assert list(resumed) == batches  # the skip applies to that one iteration only
    other_epoch = ResumableBatchSampler(lengths, batch_size=3, seed=5, mode=mode, pack_length=40)
    other_epoch.set_epoch(3)
    assert list(other_epoch) != batches
    ranks = []
    for rank in range(2):
        sampler = ResumableBatchSampler(lengths, batch_size=3, seed=5, mode=mode, pack_length=40, rank=rank, world_size=2)
        sampler.set_epoch(0)
        # A packed batch is a list of rows, each a list of indices.
        ranks.append([i for batch in sampler for item in batch for i in (item if mode == "packed" else [item])])
    assert ranks[0] and not set(ranks[0]) & set(ranks[1])
    assert len(list(ResumableBatchSampler(lengths, 3, 5, mode, pack_length=40, rank=0, world_size=2))) == len(
        list(ResumableBatchSampler(lengths, 3, 5, mode, pack_length=40, rank=1, world_size=2))
    )


def _tiny_data(tmp_path):
    import json

    path = tmp_path / "data.jsonl"
    rows = [{"instruction": "Describe.", "input": "<seq> M K T A Y </seq>", "output": f"Protein {i}."} for i in range(12)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


class _TwoRanks:
    """What StageModule asks of a data-parallel trainer, for rank 0 of two whose other rank's loss was NaN:
    the all-reduce returns (both ranks' answer tokens, one non-finite loss)."""

    world_size = 2

    class strategy:
        @staticmethod
        def reduce(stats, reduce_op):
            assert reduce_op == "sum"
            return torch.stack([stats[0] * 2, stats[1] + 1])


def test_a_nonfinite_loss_on_another_rank_drops_this_ranks_update_too(tmp_path):
    """Data parallel: Lightning refuses a skipped training_step, and a rank without a backward would hang the
    others; so a finite rank runs a backward of nothing and drops the update, as the NaN rank does."""
    model, processor = build_tiny()
    datamodule = SFTDataModule(
        str(_tiny_data(tmp_path)), ConversationTokenizer(processor, 256, mode="caption"), pad_token_id=3, processor=processor, batch_size=2
    )
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    module = StageModule(apply_stage_spec(model, STAGE1), OptimConfig(total_steps=5, warmup_steps=0))
    module._trainer = _TwoRanks()
    loss = module.training_step(batch, 0)
    assert loss is not None and float(loss) == 0.0 and loss.requires_grad  # this rank's own loss was finite
    assert module.guard.skipped == 1
    loss.backward()
    assert any(p.grad is not None for p in model.parameters())
    module.on_before_optimizer_step(None)
    assert all(p.grad is None for p in model.parameters()) and not module._drop_update
