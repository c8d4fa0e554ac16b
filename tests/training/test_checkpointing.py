"""training/checkpointing.py: the projector file's shape check, and the random state a checkpoint carries."""

import random

import numpy as np
import pytest
import torch

from protein_llava.builders import build_protein_llm
from protein_llava.model.configuration import ProteinLLMConfig
from protein_llava.text_tokenizer import byte_level_tokenizer
from protein_llava.training.checkpointing import check_projector_file, random_states, restore_random_states, save_projector


def _tiny_config(**projector):
    config = ProteinLLMConfig.from_preset("tiny").with_projector(output_norm="rms", **projector)
    return config


def test_the_projector_gains_initial_value_is_not_a_shape(tmp_path):
    model, _ = build_protein_llm(_tiny_config(), byte_level_tokenizer())
    save_projector(model, tmp_path / "projector.safetensors")
    # The gain's start measured with another thread count differs in its last bits: the same projector.
    config = model.config
    config.projector_config.output_scale = config.projector_config.output_scale * (1 + 1e-7)
    check_projector_file(tmp_path / "projector.safetensors", config)
    # Another reduction is another shape: refused, naming the field.
    other = _tiny_config(token_reduction="mean_pool", pool_stride=2)
    with pytest.raises(ValueError, match="was trained for projector_config="):
        check_projector_file(tmp_path / "projector.safetensors", other)


def test_random_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    saved = random_states()
    torch.save({"random_states": [saved]}, tmp_path / "state.pt")
    expected = (torch.rand(4), random.random(), np.random.rand())
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    restore_random_states(torch.load(tmp_path / "state.pt", weights_only=True)["random_states"][0])
    again = (torch.rand(4), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


def test_a_resume_on_another_number_of_processes_warns_and_keeps_the_seeded_state(caplog):
    import lightning as L

    from protein_llava import build_tiny
    from protein_llava.training.optim import OptimConfig
    from protein_llava.training.stage import StageModule

    model, _ = build_tiny(seed=0)
    module = StageModule(model, OptimConfig(total_steps=1))
    module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    states = [random_states(), random_states()]  # written by two processes
    with caplog.at_level("WARNING"):
        module.on_load_checkpoint({"random_states": states})
    assert "written by 2 process(es) and is resumed by 1" in caplog.text and module._resumed_random_states is None
    module.on_load_checkpoint({"random_states": states[:1]})  # the same number: restored before the next step
    assert module._resumed_random_states is states[0]


def test_resume_auto_passes_over_a_sharded_checkpoint_cut_short(tmp_path):
    from lightning.fabric.utilities.load import _METADATA_FILENAME

    from protein_llava.training.checkpointing import SHARDED_CHECKPOINT_DONE, newest_checkpoint

    # The file Lightning's ModelParallelStrategy writes last, after every shard, is the one we look for.
    assert SHARDED_CHECKPOINT_DONE == _METADATA_FILENAME
    complete, cut_short = tmp_path / "step000002.ckpt", tmp_path / "step000004.ckpt"
    for folder in (complete, cut_short):
        folder.mkdir()
        (folder / "__0_0.distcp").write_bytes(b"shard")
    (complete / SHARDED_CHECKPOINT_DONE).write_bytes(b"meta")
    assert newest_checkpoint(tmp_path) == complete
    (cut_short / SHARDED_CHECKPOINT_DONE).write_bytes(b"meta")
    import os

    os.utime(cut_short, (complete.stat().st_mtime + 10, complete.stat().st_mtime + 10))
    assert newest_checkpoint(tmp_path) == cut_short
