"""Training: the thin Lightning modules of both stages, the datamodule, checkpointing, export, the held-out
evaluation callback and the learning experiment. `train.py` calls `protein_llava.training.run.train`.

Nothing is imported here, so `import protein_llava` stays free of Lightning and Hydra.
"""
