"""Typed, validated settings of an evaluation run (eval.py fills them from Hydra; tests build them directly).

The one home of every default: `EvalConfig` is stored in Hydra's ConfigStore as `eval_schema`, which
configs/eval/eval.yaml puts first in its defaults list, so the YAML holds only the choice of benchmark.
Fields with a fixed set of values are `str` (OmegaConf types no `Literal`) and checked in `__post_init__`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from ..loading import DTYPES

if TYPE_CHECKING:
    from omegaconf import DictConfig

BENCHMARK_NAMES = ("proteinlmbench", "sequence_grounded")
MODES = ("loglik", "generate", "description")
ABLATIONS = ("none", "shuffle")
MODEL_ARM, BASELINE_ARM, RETRIEVAL_ARM, PROBE_ARM = "model", "baseline", "retrieval", "probe"
ABLATED_SUFFIX = "_ablated"
DEMO_MODEL = "checkpoints/smollm2-demo-stage2/export"
DEMO_BASELINE = "checkpoints/text-only-stage2/export"
DEMO_HELDOUT = "checkpoints/demo-data/heldout.jsonl"
DEMO_TRAIN = "checkpoints/demo-data/train.jsonl"
DEFAULT_OUT_ROOT = "checkpoints/eval"
SCHEMA_NAME = "eval_schema"
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "eval"


@dataclass
class BenchmarkConfig:
    name: str = "sequence_grounded"
    """Which benchmark: ProteinLMBench, or "which description fits this protein?" items from SFT records."""
    label: str = "sequence_grounded"
    """What this setup is called (its eval config's file name: "sequence_grounded", "scl2205", ...); the
    default output folder is checkpoints/eval/<label>."""
    path: str = DEMO_HELDOUT
    """A local file (.json/.jsonl/.parquet, and .csv for ProteinLMBench) or, for ProteinLMBench, a hub dataset id."""
    hub_config: str = "evaluation"
    """The hub dataset's config name (ProteinLMBench: "evaluation")."""
    split: str = "train"
    """The hub dataset's split (ProteinLMBench: "train")."""
    train_paths: list[str] = field(default_factory=list)
    """sequence_grounded: training data files; items whose protein occurs there are flagged and left out."""
    num_options: int = 4
    """sequence_grounded: options per item (the answer and num_options - 1 other descriptions)."""
    seed: int = 0
    """sequence_grounded: seed of the distractor draw."""
    retrieval: bool = False
    """sequence_grounded: also score a retrieval arm, which answers with the descriptions of the training
    protein nearest by alignment identity (see protein_llava.evaluation.retrieval); needs `train_paths`."""
    retrieval_candidates: int | None = 50
    """Training proteins aligned per item (and per option) after the 3-mer prefilter; null: all of them."""
    probe: bool = False
    """sequence_grounded: also score a probe arm, a logistic regression per question type on the model's own
    frozen encoder features (mean-pooled), fit on the training records (see protein_llava.evaluation.probe);
    needs `train_paths` and a multimodal model."""
    default_mode: str = "loglik"
    """The scoring this benchmark is meant for (eval.yaml's `mode` defaults to it): ProteinLMBench asks for
    option numbers (loglik); SFT-derived items score each option's text as the reply (description)."""
    default_ablation: str = "none"
    """The protein-ablation control eval.yaml's `ablation` defaults to (shuffle where items carry proteins)."""

    def __post_init__(self):
        if self.name not in BENCHMARK_NAMES:
            raise ValueError(f"benchmark.name must be one of {BENCHMARK_NAMES}, got {self.name!r}")
        if not self.path:
            raise ValueError("benchmark.path is empty")
        if self.num_options < 2:
            raise ValueError(f"benchmark.num_options must be >= 2, got {self.num_options}")
        self.train_paths = [str(p) for p in self.train_paths or []]
        if self.retrieval and (self.name != "sequence_grounded" or not self.train_paths):
            raise ValueError("benchmark.retrieval=true needs benchmark.name=sequence_grounded and benchmark.train_paths")
        if self.probe and (self.name != "sequence_grounded" or not self.train_paths):
            raise ValueError("benchmark.probe=true needs benchmark.name=sequence_grounded and benchmark.train_paths")
        if self.retrieval_candidates is not None and self.retrieval_candidates < 1:
            raise ValueError(f"benchmark.retrieval_candidates must be >= 1 or null, got {self.retrieval_candidates}")
        if self.default_ablation not in ABLATIONS:
            raise ValueError(f"benchmark.default_ablation must be one of {ABLATIONS}, got {self.default_ablation!r}")
        if self.default_mode not in MODES:
            raise ValueError(f"benchmark.default_mode must be one of {MODES}, got {self.default_mode!r}")


@dataclass
class EvalConfig:
    model: str = DEMO_MODEL
    """The model under test: a saved ProteinLLM or causal-LM folder, or "smollm2" (the bare decoder)."""
    baseline: str | None = DEMO_BASELINE
    """The text-only baseline on the same items (folder or "smollm2"); None evaluates `model` alone."""
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    """What to evaluate on."""
    mode: str | None = None
    """None: the benchmark's `default_mode`. loglik: log-probability of each option number (deterministic). generate: the paper's protocol,
    first integer of up to `max_new_tokens` generated tokens. description: mean per-token log-probability
    of each option's TEXT as the reply to the item's own prompt through the chat template (no option
    numbers, so no position bias; it asks what SFT taught: which description the model would write)."""
    prompt_format: str = "raw"
    """raw: the official prompt text as is. chat: that text as the user turn of the chat template."""
    limit: int | None = None
    """Evaluate only the first N benchmark entries (scored or flagged)."""
    out: str | None = None
    """Folder for report.json, report.md, report.png, predictions.jsonl, flagged.jsonl; None:
    checkpoints/eval/<benchmark.label>."""
    batch_size: int = 8
    """Questions per forward pass."""
    max_new_tokens: int = 20
    """generate: new tokens per answer."""
    temperature: float = 0.0
    """generate: 0 is greedy; > 0 samples at that temperature (the paper used 0.1), seeded by `seed`."""
    permutations: bool = False
    """loglik: also score each item under every cyclic shift of its options and average the probabilities."""
    ablation: str | None = None
    """None: the benchmark's `default_ablation`. shuffle: also score every arm on the same items with each item's protein replaced by another protein
    of the benchmark with a similar length (`benchmark.ablate_proteins`); a model that reads the sequence
    falls to chance there. Reported as arms named `<arm>_ablated`."""
    seed: int = 0
    """Seed of sampling and of the bootstrap."""
    bootstrap_samples: int = 1000
    """Resamples for the 95% interval."""
    dtype: str = "float32"
    """Weights' dtype: float32, bfloat16 or float16."""
    device: str = "auto"
    """"auto" (cuda if available), "cpu", "cuda", "cuda:1", ..."""
    attn_implementation: str = "sdpa"
    """Attention kernels: "sdpa" or "eager" (loglik needs custom masks); "flash_attention_2" only for generate."""
    progress: bool = True
    """Show a tqdm bar per arm."""

    def __post_init__(self):
        if isinstance(self.benchmark, dict):
            self.benchmark = BenchmarkConfig(**_known(BenchmarkConfig, self.benchmark, "benchmark"))
        if not self.model:
            raise ValueError("model is empty: give a model folder or 'smollm2'")
        if self.baseline in ("", "null", "none", "None"):
            self.baseline = None
        if self.mode is None:
            self.mode = self.benchmark.default_mode
        if self.ablation is None:
            self.ablation = self.benchmark.default_ablation
        if self.out is None:
            self.out = f"{DEFAULT_OUT_ROOT}/{self.benchmark.label}"
        if self.mode not in MODES:
            raise ValueError(f"mode must be 'loglik', 'generate' or 'description', got {self.mode!r}")
        if self.ablation not in ABLATIONS:
            raise ValueError(f"ablation must be 'none' or 'shuffle', got {self.ablation!r}")
        if self.ablation == "shuffle" and self.benchmark.name != "sequence_grounded":
            raise ValueError("ablation=shuffle swaps the items' proteins: it needs benchmark.name=sequence_grounded")
        if self.prompt_format not in ("raw", "chat"):
            raise ValueError(f"prompt_format must be 'raw' or 'chat', got {self.prompt_format!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or null, got {self.limit}")
        for name in ("batch_size", "max_new_tokens", "bootstrap_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.permutations and self.mode != "loglik":
            raise ValueError("permutations=true averages option probabilities, so it needs mode=loglik")
        if self.mode in ("loglik", "description") and self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"mode=loglik needs attn_implementation sdpa or eager, got {self.attn_implementation!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @classmethod
    def from_dict(cls, values: dict) -> EvalConfig:
        """Build from a plain dict (e.g. a resolved Hydra config); unknown keys are an error naming them."""
        return cls(**_known(cls, values, "eval config"))

    def arm_sources(self) -> dict[str, str]:
        """{arm name: model source}, the model first."""
        arms = {MODEL_ARM: self.model}
        if self.baseline is not None:
            arms[BASELINE_ARM] = self.baseline
        return arms


def register_configs() -> None:
    """Store `EvalConfig` as `eval_schema` in Hydra's ConfigStore (eval.yaml's defaults list names it)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=EvalConfig)


def compose_eval_config(overrides=(), config_dir: str | Path = CONFIG_DIR) -> DictConfig:
    """eval.py's config with `overrides`, composed by Hydra as `python eval.py OVERRIDES` would."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        return compose(config_name="eval", overrides=list(overrides))


def _known(cls, values: dict, where: str) -> dict:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {where} keys {unknown}; known: {sorted(names)}")
    return dict(values)


__all__ = [
    "ABLATED_SUFFIX",
    "BASELINE_ARM",
    "BENCHMARK_NAMES",
    "MODEL_ARM",
    "MODES",
    "PROBE_ARM",
    "RETRIEVAL_ARM",
    "BenchmarkConfig",
    "EvalConfig",
    "compose_eval_config",
    "register_configs",
]
