"""The overrides of the training tests' shared two-stage run (tests/training/conftest.py), for the tests that
repeat it (the kill-and-resume test compares against it)."""

_COMMON = ["model=tiny", "trainer.max_steps=6", "checkpoint_every=3", "trainer.log_every_n_steps=1", "progress_every=1"]

# Stage 2 with LoRA dropout, so that repeating it killed midway also shows that a resume restores the random
# state the dropout masks are drawn from.
TWO_STAGE_OVERRIDES = {
    1: ["stage=1", *_COMMON],
    2: ["stage=2", *_COMMON, "stage2.lora.dropout=0.1"],
}
