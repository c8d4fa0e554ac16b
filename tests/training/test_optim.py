"""training/optim.py: the optimizer's parameter groups and their learning rates."""

import pytest

from protein_llava import build_preset
from protein_llava.training.config import LoraSettings
from protein_llava.training.optim import OptimConfig
from protein_llava.training.stage import StageModule, apply_stage_spec, stage2_spec


def _lr_of_each_parameter(module: StageModule) -> dict[str, float]:
    optimizer = module.configure_optimizers()["optimizer"]
    lr_by_id = {}
    for group in optimizer.param_groups:
        # An empty group loses its lr and betas in torch.distributed.checkpoint's loader (FSDP resume).
        assert group["params"], "an empty parameter group"
        for parameter in group["params"]:
            assert id(parameter) not in lr_by_id, "a parameter sits in two groups"
            lr_by_id[id(parameter)] = group["initial_lr"]  # the peak rate; "lr" is the schedule's step-0 value
    trainable = {name: p for name, p in module.model.named_parameters() if p.requires_grad}
    assert set(lr_by_id) == {id(p) for p in trainable.values()}, "the groups must hold exactly the trainable parameters"
    return {name: lr_by_id[id(p)] for name, p in trainable.items()}


def _stage2_model():
    model, _ = build_preset("tiny", projector={"summary_token": True})
    return apply_stage_spec(model, stage2_spec("lora"), LoraSettings(r=2))


@pytest.mark.parametrize(
    ("projector_lr", "summary_lr", "want"),
    [
        # (LoRA, residue projection, summary projection)
        (1e-4, 5e-4, (1e-3, 1e-4, 5e-4)),
        (1e-4, None, (1e-3, 1e-4, 1e-4)),
        (None, 5e-4, (1e-3, 1e-3, 5e-4)),
        (None, None, (1e-3, 1e-3, 1e-3)),
    ],
)
def test_the_summary_projection_trains_at_its_own_rate(projector_lr, summary_lr, want):
    module = StageModule(_stage2_model(), OptimConfig(lr=1e-3, total_steps=1, projector_lr=projector_lr, summary_lr=summary_lr))
    lrs = _lr_of_each_parameter(module)
    lora = {lr for name, lr in lrs.items() if "lora_" in name}
    residue = {lr for name, lr in lrs.items() if name.startswith("projector.projection.")}
    summary = {lr for name, lr in lrs.items() if name.startswith("projector.summary_projection.")}
    assert lora and residue and summary
    assert (lora, residue, summary) == ({want[0]}, {want[1]}, {want[2]})


def test_summary_lr_must_be_positive():
    with pytest.raises(ValueError, match="summary_lr must be > 0"):
        OptimConfig(summary_lr=0.0)
