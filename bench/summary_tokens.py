"""How distinct are different proteins' summary tokens? The mean cosine between the summary tokens of every
pair of training proteins (1: the decoder gets the same summary token whatever the protein).

    python bench/summary_tokens.py --train checkpoints/scl2205-cpu/trn.jsonl --every 6 MODEL_FOLDER [...]
"""

import argparse

import numpy as np
import torch

from protein_llava import ProteinLLM
from protein_llava.evaluation.probe import load_labelled_proteins, pooled_features


def mean_summary_cosine(model: ProteinLLM, proteins: list[str]) -> float:
    projector = model.projector
    if projector.summary_projection is None:
        raise ValueError("the model's projector has no summary token")
    features = torch.from_numpy(pooled_features(model.protein_encoder, proteins))
    with torch.no_grad():
        if projector.config.summary_standardize:
            features = (features - projector.summary_center) / projector.summary_scale
        tokens = projector.summary_projection(features)
        if projector.output_norm is not None:
            tokens = projector.output_norm(tokens)
    unit = torch.nn.functional.normalize(tokens.double(), dim=-1).numpy()
    cosine = unit @ unit.T
    n = len(proteins)
    return float((cosine.sum() - np.trace(cosine)) / (n * (n - 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="exported ProteinLLM folders")
    parser.add_argument("--train", required=True, help="training records (JSONL) whose proteins to use")
    parser.add_argument("--every", type=int, default=6, help="take every N-th training record")
    args = parser.parse_args()
    proteins = list(load_labelled_proteins([args.train]).residues[:: args.every])
    for folder in args.models:
        cosine = mean_summary_cosine(ProteinLLM.from_pretrained(folder), proteins)
        print(f"{folder}: mean summary-token cosine between {len(proteins)} proteins {cosine:.3f}")


if __name__ == "__main__":
    main()
