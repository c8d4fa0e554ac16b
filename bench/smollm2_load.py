"""SmolLM2-135M-Instruct load time: de-quantising the GGUF (`load_smollm2(cache=False)`) against reading the
cached de-quantised folder (`load_smollm2()`), each in a fresh process so imports and caches are not shared.

    python bench/smollm2_load.py [--repeats 3]

Prints the median seconds of each and their ratio; the cache folder is written first if it is missing.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

TIMED = """
import time, torch
from protein_llava.builders import load_smollm2
start = time.perf_counter()
load_smollm2(cache={cache})
print(time.perf_counter() - start)
"""


def seconds(cache: bool) -> float:
    result = subprocess.run([sys.executable, "-c", TIMED.format(cache=cache)], capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    seconds(cache=True)  # writes the cache folder if this machine has none yet
    gguf, cached = [], []
    for _ in range(args.repeats):  # alternating, so both sides see the same machine load
        gguf.append(seconds(cache=False))
        cached.append(seconds(cache=True))
    gguf_s, cached_s = statistics.median(gguf), statistics.median(cached)
    print(f"GGUF de-quantisation {gguf_s:.2f} s, cached folder {cached_s:.2f} s (medians of {args.repeats}); "
          f"{gguf_s / cached_s:.0f}x")


if __name__ == "__main__":
    main()
