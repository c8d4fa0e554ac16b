"""Constants every layer shares, in a module that imports nothing, so the model core (loss, processing) never
depends on the data pipeline to learn them (as LLaVA's `constants.py`)."""

IGNORE_INDEX = -100
"""Label of a position that contributes no loss: prompt tokens, padding, protein placeholders."""

PROTEIN_TOKEN = "<protein>"
"""The placeholder token; the processor expands each protein into one per projected feature row."""

SEQ_OPEN, SEQ_CLOSE = "<seq>", "</seq>"
"""The markup a protein sequence is written in inside text: `<seq> M K T … </seq>`."""
