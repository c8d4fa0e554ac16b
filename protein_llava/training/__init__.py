"""Training: the typed config and its plan, the one Lightning module of both stages (`stage.py`), the
datamodule, checkpointing, export, the run summary, the console, the held-out evaluation callback and the
learning experiment. `train.py` calls `protein_llava.training.run.train`.

Nothing is imported here, so `import protein_llava` stays free of Lightning and Hydra.
"""
