"""Training: the typed config and its plan, the one Lightning module of both stages (`stage.py`), the
datamodule, checkpointing, export, the run summary and the console
(the learning experiment and its held-out callback are in `protein_llava.experiment`). `train.py` calls `protein_llava.training.run.train`.

Nothing is imported here, so `import protein_llava` stays free of Lightning and Hydra.
"""
