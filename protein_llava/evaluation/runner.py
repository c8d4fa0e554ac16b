"""One evaluation run: build the benchmark, score it with each arm in turn, pair the outcomes, write the report."""

from __future__ import annotations

import gc

import torch

from ..loading import is_protein_llm_folder
from ..loading import LoadedModel
from .arms import check_model_source, load_arm
from .benchmarks import (
    ANSWER_ANCHOR,
    Benchmark,
    BenchmarkItem,
    FlaggedItem,
    ablate_proteins,
    build_sequence_grounded,
    cyclic_shift,
    first_integer,
    load_proteinlmbench,
    official_prompt,
    option_text,
    prediction_record,
)
from .config import ABLATED_SUFFIX, MODEL_ARM, PROBE_ARM, RETRIEVAL_ARM, BenchmarkConfig, EvalConfig
from .probe import PROBE_C, LinearProbe, load_labelled_proteins
from .report import ArmResult, build_report, write_report
from .retrieval import load_training_proteins, retrieval_predictions
from .scoring import generate_answers, option_probabilities, score_continuations, score_options


def load_benchmark(config: BenchmarkConfig, limit: int | None = None) -> Benchmark:
    """The benchmark `config` names, its first `limit` entries."""
    if config.name == "proteinlmbench":
        return load_proteinlmbench(config.path, config.hub_config, config.split, limit)
    if config.name == "sequence_grounded":
        return build_sequence_grounded(config.path, config.train_paths, config.num_options, config.seed, limit)
    raise ValueError(f"unknown benchmark {config.name!r}")


def item_prompt(arm: LoadedModel, item: BenchmarkItem, config: EvalConfig) -> str:
    """The text `arm` reads for `item`. In chat + loglik mode the assistant turn starts with the answer
    anchor, so that option numbers are scored right after "The correct option is:" as in raw mode."""
    prefix = ANSWER_ANCHOR if config.prompt_format == "chat" and config.mode == "loglik" else ""
    return arm.render(official_prompt(item.question, item.options), config.prompt_format, assistant_prefix=prefix)


def evaluate_arm(arm: LoadedModel, items: list[BenchmarkItem], config: EvalConfig, name: str | None = None) -> ArmResult:
    """Score `items` with `arm`: per item the predicted option number and whether it is the gold one.

    `name` names the result (default: the arm's name), e.g. for the same arm on the ablated items.
    """
    result = ArmResult(name or arm.name, arm.source, arm.multimodal)
    readable = []
    for item in items:
        reason = arm.problem(official_prompt(item.question, item.options))
        if reason is None:
            readable.append(item)
        else:
            result.unreadable.append(FlaggedItem(item.item_id, reason, f"{arm.name} ({arm.source}) cannot read this item"))
    texts = [item_prompt(arm, item, config) for item in readable]
    # A chat template places its own special tokens; the raw prompt gets the tokenizer's (e.g. BOS).
    batching = dict(add_special_tokens=config.prompt_format == "raw", batch_size=config.batch_size, progress=config.progress)
    if config.mode == "generate":
        outputs = generate_answers(
            arm, texts, max_new_tokens=config.max_new_tokens, temperature=config.temperature, seed=config.seed, **batching
        )
        for item, output in zip(readable, outputs):
            result.predictions[item.item_id] = prediction_record(item, first_integer(output), output=output)
        return result

    if config.mode == "description":
        # The item's own prompt (the question, for ProteinLMBench) as the user turn; the options' texts as replies.
        texts = [arm.render(item.context or item.question, "chat") for item in readable]
        continuations = [[option_text(option) for option in item.options] for item in readable]
        scores = score_continuations(
            arm, texts, continuations, add_special_tokens=False, batch_size=config.batch_size, progress=config.progress
        )
    else:
        scores = score_options(arm, texts, [item.num_options for item in readable], **batching)
    permuted = _permutation_probabilities(arm, readable, scores, config) if config.permutations else None
    for index, (item, item_scores) in enumerate(zip(readable, scores)):
        probabilities = option_probabilities(item_scores)
        predicted = max(range(item.num_options), key=lambda j: item_scores[j]) + 1  # ties → lowest number
        extra = dict(scores=item_scores, probabilities=probabilities)
        if permuted is not None:
            averaged = permuted[index]
            predicted_permuted = max(range(item.num_options), key=lambda j: averaged[j]) + 1
            extra.update(
                probabilities_permuted=averaged,
                predicted_permuted=predicted_permuted,
                correct_permuted=predicted_permuted == item.answer,
            )
        result.predictions[item.item_id] = prediction_record(item, predicted, **extra)
    return result


def _permutation_probabilities(
    arm: LoadedModel, items: list[BenchmarkItem], scores: list[list[float]], config: EvalConfig
) -> list[list[float]]:
    """Per item, option probabilities averaged over all K cyclic shifts of its options (shift 0 = `scores`),
    each mapped back to the original option order."""
    shifted_items = [(index, shift) for index, item in enumerate(items) for shift in range(1, item.num_options)]
    texts = [item_prompt(arm, cyclic_shift(items[index], shift), config) for index, shift in shifted_items]
    shifted_scores = score_options(
        arm,
        texts,
        [items[index].num_options for index, _ in shifted_items],
        add_special_tokens=config.prompt_format == "raw",
        batch_size=config.batch_size,
        progress=config.progress,
    )
    totals = [option_probabilities(item_scores) for item_scores in scores]
    for (index, shift), item_scores in zip(shifted_items, shifted_scores):
        k = items[index].num_options
        for position, probability in enumerate(option_probabilities(item_scores)):
            totals[index][(position + shift) % k] += probability  # position j showed original option (j + shift) % k
    return [[p / items[index].num_options for p in probabilities] for index, probabilities in enumerate(totals)]


def check_probe_model(config: EvalConfig) -> None:
    """The probe arm reads the model's own encoder: fail before anything loads if `config.model` has none."""
    if config.benchmark.probe and not is_protein_llm_folder(config.model):
        raise ValueError(
            f"benchmark.probe=true fits its classifiers on the model's own protein encoder, but model={config.model} "
            "is a text-only model; give a ProteinLLM folder or set benchmark.probe=false"
        )


def probe_results(arm: LoadedModel, item_sets: dict[str, list[BenchmarkItem]], config: EvalConfig) -> list[ArmResult]:
    """The probe arm on every item set: fit once on the training records with `arm`'s encoder features."""
    encoder = arm.model.protein_encoder
    probe = LinearProbe.fit(encoder, load_labelled_proteins(config.benchmark.train_paths))
    source = (
        f"logistic regression (C={PROBE_C}) per question type on {arm.source}'s frozen encoder, layer "
        f"{encoder.repr_layer} mean-pooled; {probe.num_training} training records"
    )
    return [
        ArmResult(PROBE_ARM + suffix, source, multimodal=False, predictions=probe.predictions(items))
        for suffix, items in item_sets.items()
    ]


def run_evaluation(config: EvalConfig) -> dict:
    """Evaluate every arm of `config` on the same items; write and return the report.

    Model sources are checked before the benchmark or any model loads; arms load one at a time. The probe
    arm is fit while the model is loaded (it reads the model's encoder) and reported after retrieval.
    """
    for name, source in config.arm_sources().items():
        check_model_source(source, name)
    check_probe_model(config)
    benchmark = load_benchmark(config.benchmark, config.limit)
    item_sets = {"": benchmark.items}
    if config.ablation == "shuffle":
        item_sets[ABLATED_SUFFIX] = ablate_proteins(benchmark.items, seed=config.seed)
    results, probed = [], []
    for name, source in config.arm_sources().items():
        arm = load_arm(name, source, config.dtype, config.device, config.attn_implementation)
        for suffix, items in item_sets.items():
            results.append(evaluate_arm(arm, items, config, name=name + suffix))
        if name == MODEL_ARM and config.benchmark.probe:
            probed = probe_results(arm, item_sets, config)
        del arm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if config.benchmark.retrieval:
        training = load_training_proteins(config.benchmark.train_paths)
        source = f"nearest of {len(training.residues)} training proteins by alignment identity"
        for suffix, items in item_sets.items():
            predictions = retrieval_predictions(items, training, candidates=config.benchmark.retrieval_candidates)
            results.append(ArmResult(RETRIEVAL_ARM + suffix, source, multimodal=False, predictions=predictions))
    results += probed
    report, predictions, flagged = build_report(benchmark, results, config)
    write_report(report, predictions, flagged, config.out)
    return report


__all__ = [
    "ArmResult",
    "check_probe_model",
    "evaluate_arm",
    "item_prompt",
    "load_benchmark",
    "probe_results",
    "run_evaluation",
]
