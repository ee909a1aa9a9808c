"""Drawing one token per row: ``torch.multinomial`` against ``vlreason.rollout.hf.sample_rows``.

The HF rollout engine draws one token per sequence and decoding step from ``[rows, V]``
probabilities (after temperature and top-p). Both draws are timed on the same probabilities,
on this machine's CPU, at a GRPO batch's row count and two vocabulary sizes: the tiny
tokenizer's and Qwen's.

    python benchmarks/token_sampling.py --json benchmarks/results/token_sampling.json

Reports milliseconds per draw (median of ``--repeats``) and the ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from vlreason.rollout.hf import sample_rows

VOCABS = {"tiny tokenizer": 1032, "Qwen": 151_936}


def timed_ms(draw, repeats: int) -> float:
    """Median milliseconds of ``draw()`` over ``repeats`` calls (after one warm-up call)."""
    draw()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        draw()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def measure(rows: int, vocab: int, repeats: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, vocab, generator=generator) * 3
    probs = torch.softmax(logits, dim=-1)
    multinomial = timed_ms(lambda: torch.multinomial(probs, 1, generator=generator), repeats)
    inverse_cdf = timed_ms(lambda: sample_rows(probs, generator), repeats)
    return {"rows": rows, "vocab": vocab, "multinomial_ms": round(multinomial, 3),
            "sample_rows_ms": round(inverse_cdf, 3), "speedup": round(multinomial / inverse_cdf, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="sequences decoded together (8 prompts x G=8)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = []
    for name, vocab in VOCABS.items():
        result = {"vocabulary": name, **measure(args.rows, vocab, args.repeats)}
        results.append(result)
        print(f"{name:>15} (V={vocab}): multinomial {result['multinomial_ms']:.3f} ms, "
              f"sample_rows {result['sample_rows_ms']:.3f} ms, {result['speedup']}x")
    if args.json:
        args.json.write_text(json.dumps({
            "command": "python benchmarks/token_sampling.py --json benchmarks/results/token_sampling.json",
            "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                        "torch": torch.__version__},
            "results": results,
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()
