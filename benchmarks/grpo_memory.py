"""Peak memory and time of one GRPO step at Qwen's real vocabulary: vlreason without micro-batches,
with micro-batches of 8 and of 2 completions, and TRL's GRPOTrainer, side by side.

All four start from the same saved random Qwen2.5-VL (vocabulary 151,936, hidden 512, two
layers; embeddings tied as in Qwen2.5-VL-3B), the same 4 prompts x G = 8, 256 new tokens forced
(end-of-sequence suppressed, so every completion is full length), beta 0.04 with a frozen
reference, the vision tower frozen. On a GPU they run in bfloat16 and the peak is CUDA's
``max_memory_allocated`` over the timed steps; on the CPU in float32 and the peak is the
process's resident set (``VmHWM``, reset after the warm-up). ``baseline_mb`` is what each holds
before a step (weights, optimizer state, reference), so ``peak - baseline`` is the step's own
working memory. Each variant runs in its own process, so no peak leaks into another.

    python benchmarks/grpo_memory.py --json benchmarks/results/grpo_memory.json

Writes ``{"peak_mb": {"ours", "ours_micro8", "ours_micro2", "trl"}, "s_per_step": {...}, ...}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from grpo_step_vs_trl import StepTimer, _peak_rss_mb, _reset_peak_rss, _trl_template, _version, digit_share
from PIL import Image, ImageDraw

from vlreason.config import load_config
from vlreason.models.tiny import TinySpec
from vlreason.models.vlm import build_tiny_vlm, load_vlm, save_vlm
from vlreason.training.grpo import GRPOTrainer

PROMPTS = 4
GROUP = 8
NEW_TOKENS = 256
IMAGE_SIDE = 224
BETA = 0.04
LEARNING_RATE = 1e-6
SPEC = TinySpec(hidden_size=512, num_layers=2, num_heads=8, num_kv_heads=2, intermediate_size=1024,
                vision_hidden_size=128, vision_layers=2, vision_heads=2, max_tokens=256, vocab_size=151_936)
QUESTION = "Where is the shape? Answer with its bounding box [x1, y1, x2, y2]."
VARIANTS = {"ours": None, "ours_micro8": 8, "ours_micro2": 2, "trl": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # one variant, in a child
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, Path(args.root), args.warmup, args.steps)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root)
        runs = {name: _child(name, root, args) for name in VARIANTS}
    result = {
        "peak_mb": {name: run["peak_mb"] for name, run in runs.items()},
        "s_per_step": {name: run["s_per_step"] for name, run in runs.items()},
        "baseline_mb": {name: run["baseline_mb"] for name, run in runs.items()},
        "ratios": {"ours_micro8_peak_vs_trl": round(runs["ours_micro8"]["peak_mb"] / runs["trl"]["peak_mb"], 3),
                   "ours_micro8_time_vs_ours": round(runs["ours_micro8"]["s_per_step"] / runs["ours"]["s_per_step"],
                                                     3)},
        "step_times_s": {name: run["times"] for name, run in runs.items()},
        "settings": {"prompts": PROMPTS, "num_generations": GROUP, "new_tokens_forced": NEW_TOKENS,
                     "image": f"{IMAGE_SIDE}x{IMAGE_SIDE}", "beta": BETA, "vision_frozen": True,
                     "vocab_size": SPEC.vocab_size, "hidden": SPEC.hidden_size, "layers": SPEC.num_layers,
                     "device": _device(), "dtype": str(_dtype()).removeprefix("torch."),
                     "peak": "cuda max_memory_allocated" if _device() == "cuda" else "process VmHWM (RSS)",
                     "threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "trl": _version("trl"), "transformers": _version("transformers"),
                     "python": platform.python_version()},
        "command": "python benchmarks/grpo_memory.py " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


def _child(name: str, root: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--variant", name, "--root", str(root), "--warmup", str(args.warmup),
               "--steps", str(args.steps)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"variant {name} failed:\n{done.stderr[-3000:]}")
    print(f"{name}: done", file=sys.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def prepare(root: Path) -> None:
    """The saved model and a JSONL of the prompts (with their images) under ``root``."""
    save_vlm(build_tiny_vlm("tiny-qwen2.5-vl", spec=SPEC, seed=0), root / "model")
    lines = []
    for index in range(PROMPTS):
        image = Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), (235, 235, 235))
        ImageDraw.Draw(image).rectangle((20 + 30 * index, 40, 80 + 30 * index, 100), fill=(200, 30, 30))
        image.save(root / f"image_{index}.png")
        lines.append(json.dumps({"id": str(index), "images": [f"image_{index}.png"], "prompt": QUESTION}))
    (root / "prompts.jsonl").write_text("\n".join(lines) + "\n")


def run_variant(name: str, root: Path, warmup: int, steps: int) -> dict:
    torch.manual_seed(0)
    return run_trl(root, warmup, steps) if name == "trl" else run_ours(root, VARIANTS[name], warmup, steps)


def run_ours(root: Path, micro_batch: int | None, warmup: int, steps: int) -> dict:
    raw = {"output_dir": str(root / f"ours_{micro_batch}"), "data": {"train": str(root / "prompts.jsonl")},
           "stages": [{
               "kind": "grpo", "model": {"name_or_path": str(root / "model"), "dtype": _dtype_name(),
                                         "freeze_vision": True},
               "rollout": {"num_generations": GROUP, "max_new_tokens": NEW_TOKENS, "temperature": 1.0},
               "algorithm": {"beta": BETA}, "rewards": {"bench_digit_share": {}},
               "optim": {"learning_rate": LEARNING_RATE, "batch_size": PROMPTS, "max_steps": warmup + steps,
                         "micro_batch_size": micro_batch},
               "logging": {"tensorboard": False, "rollouts_every": 0, "progress": False}, "save": {"every": 0}}]}
    trainer = GRPOTrainer(load_config(None, raw=raw).stages[0])
    engine = trainer.sampler.loop.engine
    eos = torch.tensor([trainer.vlm.tokenizer.eos_token_id])
    engine.suppress = torch.cat([engine.suppress, eos])  # every completion full length
    for _ in range(warmup):
        trainer.step()
    baseline = _reset_peak()
    times, lengths = [], []
    for _ in range(steps):
        start = time.perf_counter()
        values = trainer.step()
        _sync()
        times.append(time.perf_counter() - start)
        lengths.append(values["completions/min_length"])
    assert min(lengths) == NEW_TOKENS, f"completions shorter than {NEW_TOKENS} tokens: {lengths}"
    return {"s_per_step": round(statistics.median(times), 3), "times": [round(t, 3) for t in times],
            "peak_mb": _peak_mb(), "baseline_mb": baseline}


def run_trl(root: Path, warmup: int, steps: int) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText
    from trl import GRPOConfig
    from trl import GRPOTrainer as TRLGRPOTrainer

    vlm = load_vlm(root / "model", dtype=_dtype_name())
    processor = vlm.processor
    processor.chat_template = _trl_template("qwen2_5_vl.jinja")
    model = AutoModelForImageTextToText.from_pretrained(root / "model", dtype=_dtype())
    model.model.visual.requires_grad_(False)
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    images = [Image.open(root / f"image_{index}.png").convert("RGB") for index in range(PROMPTS)]
    dataset = Dataset.from_list([{"prompt": prompt, "image": image} for image in images])
    suppress = [*vlm.adapter.suppress_token_ids(vlm.tokenizer), vlm.tokenizer.eos_token_id]
    on_gpu = _device() == "cuda"
    config = GRPOConfig(
        output_dir=str(root / "trl"), per_device_train_batch_size=PROMPTS * GROUP, num_generations=GROUP,
        max_completion_length=NEW_TOKENS, temperature=1.0, beta=BETA, learning_rate=LEARNING_RATE,
        max_steps=warmup + steps, logging_steps=1, report_to=[], save_strategy="no", use_cpu=not on_gpu,
        bf16=on_gpu, seed=0, generation_kwargs={"suppress_tokens": suppress}, dataloader_num_workers=0,
        disable_tqdm=True)
    timer = MemoryStepTimer(warmup)
    trainer = TRLGRPOTrainer(model=model, reward_funcs=[digit_share], args=config, train_dataset=dataset,
                             processing_class=processor, callbacks=[timer])
    trainer.train()
    return {"s_per_step": round(statistics.median(timer.times), 3), "times": [round(t, 3) for t in timer.times],
            "peak_mb": timer.peak_mb, "baseline_mb": timer.baseline_mb}


class MemoryStepTimer(StepTimer):
    """``StepTimer`` with the peak read the same way as for vlreason (CUDA or RSS)."""

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            self.baseline_mb = _reset_peak()
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        _sync()
        if state.global_step > self.warmup:
            self.times.append(time.perf_counter() - self.started)
            self.peak_mb = _peak_mb()


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype() -> torch.dtype:
    return torch.bfloat16 if _device() == "cuda" else torch.float32


def _dtype_name() -> str:
    return str(_dtype()).removeprefix("torch.")


def _sync() -> None:
    if _device() == "cuda":
        torch.cuda.synchronize()


def _reset_peak() -> float:
    """Start a new peak; returns the memory held now (MB)."""
    if _device() == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return round(torch.cuda.memory_allocated() / 2**20, 1)
    _reset_peak_rss()
    return _peak_rss_mb()


def _peak_mb() -> float:
    if _device() == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return _peak_rss_mb()


if __name__ == "__main__":
    main()
