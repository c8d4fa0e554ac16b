"""Evaluation: ProteinLMBench and a sequence-grounded benchmark, a ProteinLLM against a text-only baseline.

`run_evaluation(EvalConfig(...))` is the whole run (eval.py is its Hydra entry). The pieces:
benchmarks (items and flagged entries), arms (a loaded model and how it reads prompts), scoring (loglik
fast path, per-option reference, generation), two reference arms without training (retrieval: the nearest
training protein; probe: a logistic regression on the model's frozen encoder features), statistics
(bootstrap interval, exact McNemar), report.
"""

from ..loading import LoadedModel
from .arms import SMOLLM2, check_model_source, load_arm
from .benchmarks import (
    ANSWER_ANCHOR,
    OFFICIAL_INSTRUCTION,
    Benchmark,
    BenchmarkItem,
    FlaggedItem,
    build_sequence_grounded,
    cyclic_shift,
    first_integer,
    load_proteinlmbench,
    official_prompt,
    parse_proteinlmbench_item,
    training_sequences,
)
from .config import BenchmarkConfig, EvalConfig
from .report import build_report, render_markdown, write_report
from .runner import evaluate_arm, load_benchmark, run_evaluation
from .scoring import (
    digit_token_mask,
    generate_answers,
    label_token_ids,
    option_probabilities,
    score_options,
    score_options_reference,
)
from .statistics import McNemarResult, accuracy, bootstrap_ci, mcnemar_exact

__all__ = [
    "ANSWER_ANCHOR",
    "OFFICIAL_INSTRUCTION",
    "SMOLLM2",
    "LoadedModel",
    "Benchmark",
    "BenchmarkConfig",
    "BenchmarkItem",
    "EvalConfig",
    "FlaggedItem",
    "McNemarResult",
    "accuracy",
    "bootstrap_ci",
    "build_report",
    "build_sequence_grounded",
    "check_model_source",
    "cyclic_shift",
    "digit_token_mask",
    "evaluate_arm",
    "first_integer",
    "generate_answers",
    "label_token_ids",
    "load_arm",
    "load_benchmark",
    "load_proteinlmbench",
    "mcnemar_exact",
    "official_prompt",
    "option_probabilities",
    "parse_proteinlmbench_item",
    "render_markdown",
    "run_evaluation",
    "score_options",
    "score_options_reference",
    "training_sequences",
    "write_report",
]
