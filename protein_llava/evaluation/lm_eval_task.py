"""Benchmark items as an lm-evaluation-harness task, so lm-eval can score a served model on them.

`write_lm_eval_task` writes the items (each with the exact prompt text eval.py scores, proteins inline as
`<seq> … </seq>`) to a JSONL file and a task YAML beside it. lm-eval's `local-completions` then asks
`protein-llava serve` for the log-likelihood of each option number " 1" … " K" after the prompt, which is
the label term of eval.py's `loglik` mode. lm-eval is not imported here: it stays a dev dependency.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .benchmarks import BenchmarkItem


def write_lm_eval_task(items: Sequence[BenchmarkItem], prompts: Sequence[str], folder: str | Path, task: str) -> Path:
    """Write `<folder>/<task>.jsonl` and `<folder>/<task>.yaml`; returns the folder (lm-eval's --include_path)."""
    if len(items) != len(prompts):
        raise ValueError(f"got {len(items)} items but {len(prompts)} prompts")
    if not task.isidentifier():
        raise ValueError(f"task name must be an identifier (letters, digits, _), got {task!r}")
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{task}.jsonl"
    with data.open("w") as handle:
        for item, prompt in zip(items, prompts):
            choices = [f" {number}" for number in range(1, item.num_options + 1)]
            handle.write(json.dumps({"item_id": item.item_id, "prompt": prompt, "choices": choices, "answer": item.answer - 1}) + "\n")
    # The prompt already ends where the option number goes ("The correct option is:"), hence no delimiter.
    (folder / f"{task}.yaml").write_text(
        "\n".join(
            [
                f"task: {task}",
                "dataset_path: json",
                "dataset_kwargs:",
                "  data_files:",
                f"    test: {json.dumps(str(data))}",
                "test_split: test",
                "output_type: multiple_choice",
                'doc_to_text: "{{prompt}}"',
                'doc_to_choice: "{{choices}}"',
                'doc_to_target: "{{answer}}"',
                'target_delimiter: ""',
                "metric_list:",
                "  - metric: acc",
                "    aggregation: mean",
                "    higher_is_better: true",
                "",
            ]
        )
    )
    return folder


def read_lm_eval_samples(path: str | Path) -> dict[str, dict]:
    """lm-eval's --log_samples file → per item id: the option log-likelihoods and the predicted option (1-based)."""
    samples = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        sample = json.loads(line)
        logliks = [float(response[0]) for response in sample["filtered_resps"]]
        predicted = max(range(len(logliks)), key=lambda j: logliks[j]) + 1
        samples[sample["doc"]["item_id"]] = {"logliks": logliks, "predicted": predicted, "acc": float(sample["acc"])}
    return samples
