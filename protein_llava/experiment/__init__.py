"""The learning experiment (`learning.py`, run by `experiment.py` / `make experiment`) and the held-out
evaluation callback it trains with (`heldout.py`). It sits above both `training/` and `evaluation/`: it
trains arms with the one and scores them with the other, so neither of those imports the other.

Nothing is imported here, so `import protein_llava` stays free of Lightning and Hydra.
"""
