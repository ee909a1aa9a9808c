"""One GRPO step of vlreason against one of TRL's GRPOTrainer, in one process, same everything.

Both trainers start from the same saved random Qwen2.5-VL weights (a model shaped like
Qwen2.5-VL-3B in miniature: the vision tower about a fifth of the language model), the same four
448 x 448 prompts, G = 8 samples each, 64 new tokens, temperature 1, beta 0.04 with a frozen
reference, the vision tower frozen, the same reward function and the same suppressed vision
tokens during sampling. Each side runs warm-up steps, then timed steps; the peak resident memory
of each side is read from ``VmHWM`` after resetting it through ``/proc/self/clear_refs``.

    python benchmarks/grpo_step_vs_trl.py --json benchmarks/results/grpo_step_vs_trl.json

Writes ``{"vlreason_s_per_step", "trl_s_per_step", "speedup", "breakdown", ...}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import TrainerCallback

from vlreason.config import load_config
from vlreason.models.tiny import TinySpec
from vlreason.models.vlm import build_tiny_vlm, save_vlm
from vlreason.rewards import register_reward
from vlreason.rewards.parsing import completion_text
from vlreason.training.grpo import GRPOTrainer

PROMPTS = 4
GROUP = 8
NEW_TOKENS = 64
IMAGE_SIDE = 448
BETA = 0.04
LEARNING_RATE = 1e-5
SPEC = TinySpec(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=768,
                vision_hidden_size=96, vision_layers=2, vision_heads=2, min_tokens=4, max_tokens=256)
QUESTION = "Where is the shape? Answer with its bounding box [x1, y1, x2, y2]."


@register_reward("bench_digit_share")
def digit_share(completions, **kwargs):
    """Share of digits in the completion: cheap, deterministic and different between samples."""
    texts = [completion_text(c) for c in completions]  # TRL passes chat messages, vlreason strings
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, data_file, images = prepare(root)
        ours = run_vlreason(model_dir, data_file, root / "ours", args.warmup, args.steps)
        trl = run_trl(model_dir, images, root / "trl", args.warmup, args.steps)
    result = {
        "vlreason_s_per_step": ours["s_per_step"],
        "trl_s_per_step": trl["s_per_step"],
        "speedup": round(trl["s_per_step"] / ours["s_per_step"], 3),
        "breakdown": ours["breakdown"],
        "peak_rss_mb": {"vlreason": ours["peak_rss_mb"], "trl": trl["peak_rss_mb"]},
        "step_times_s": {"vlreason": ours["times"], "trl": trl["times"]},
        "settings": {"prompts": PROMPTS, "num_generations": GROUP, "max_new_tokens": NEW_TOKENS,
                     "image": f"{IMAGE_SIDE}x{IMAGE_SIDE}", "beta": BETA, "vision_frozen": True,
                     "model": ours["model"], "threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "trl": _version("trl"), "transformers": _version("transformers"),
                     "python": platform.python_version()},
        "command": "python benchmarks/grpo_step_vs_trl.py " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


def prepare(root: Path) -> tuple[Path, Path, list[Image.Image]]:
    """The saved model, a JSONL of four prompts and their images."""
    vlm = build_tiny_vlm("tiny-qwen2.5-vl", spec=SPEC, seed=0)
    model_dir = save_vlm(vlm, root / "model")
    images, lines = [], []
    for index in range(PROMPTS):
        image = Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), (235, 235, 235))
        ImageDraw.Draw(image).rectangle((40 + 60 * index, 80, 160 + 60 * index, 200), fill=(200, 30, 30))
        path = root / f"image_{index}.png"
        image.save(path)
        images.append(image)
        lines.append(json.dumps({"id": str(index), "images": [path.name], "prompt": QUESTION}))
    data_file = root / "prompts.jsonl"
    data_file.write_text("\n".join(lines) + "\n")
    return model_dir, data_file, images


def run_vlreason(model_dir: Path, data_file: Path, out: Path, warmup: int, steps: int) -> dict:
    raw = {"output_dir": str(out), "data": {"train": str(data_file)}, "stages": [{
        "kind": "grpo", "model": {"name_or_path": str(model_dir), "dtype": "float32", "freeze_vision": True},
        "rollout": {"num_generations": GROUP, "max_new_tokens": NEW_TOKENS, "temperature": 1.0},
        "algorithm": {"beta": BETA}, "rewards": {"bench_digit_share": {}},
        "optim": {"learning_rate": LEARNING_RATE, "batch_size": PROMPTS, "max_steps": warmup + steps},
        "logging": {"tensorboard": False, "rollouts_every": 0, "progress": False}, "save": {"every": 0}}]}
    trainer = GRPOTrainer(load_config(None, raw=raw).stages[0])
    for _ in range(warmup):
        trainer.step()
    _reset_peak_rss()
    times, parts = [], []
    for _ in range(steps):
        start = time.perf_counter()
        values = trainer.step()
        times.append(time.perf_counter() - start)
        parts.append({k: values[f"time/{k}"] for k in ("generate", "reward", "train")})
    breakdown = {k: round(statistics.median(p[k] for p in parts), 4) for k in parts[0]}
    model = trainer.model
    vision = sum(p.numel() for p in model.model.visual.parameters())
    language = sum(p.numel() for p in model.model.language_model.parameters())
    return {"s_per_step": round(statistics.median(times), 4), "times": [round(t, 4) for t in times],
            "breakdown": breakdown, "peak_rss_mb": _peak_rss_mb(),
            "model": {"language_params_m": round(language / 1e6, 2), "vision_params_m": round(vision / 1e6, 2),
                      "hidden": SPEC.hidden_size, "layers": SPEC.num_layers}}


def run_trl(model_dir: Path, images: list[Image.Image], out: Path, warmup: int, steps: int) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText
    from trl import GRPOConfig
    from trl import GRPOTrainer as TRLGRPOTrainer

    from vlreason.models.vlm import load_vlm

    vlm = load_vlm(model_dir, dtype="float32")
    processor = vlm.processor
    processor.chat_template = _trl_template("qwen2_5_vl.jinja")
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    model.model.visual.requires_grad_(False)
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    dataset = Dataset.from_list([{"prompt": prompt, "image": image} for image in images])
    config = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=PROMPTS * GROUP, num_generations=GROUP,
        max_completion_length=NEW_TOKENS, temperature=1.0, beta=BETA, learning_rate=LEARNING_RATE,
        max_steps=warmup + steps, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        bf16=False, seed=0, generation_kwargs={"suppress_tokens": vlm.adapter.suppress_token_ids(vlm.tokenizer)},
        dataloader_num_workers=0, disable_tqdm=True)
    timer = StepTimer(warmup)
    trainer = TRLGRPOTrainer(model=model, reward_funcs=[digit_share], args=config, train_dataset=dataset,
                             processing_class=processor, callbacks=[timer])
    trainer.train()
    return {"s_per_step": round(statistics.median(timer.times), 4), "times": [round(t, 4) for t in timer.times],
            "peak_rss_mb": timer.peak_rss_mb}


class StepTimer(TrainerCallback):
    """Times TRL's steps after the warm-up ones and reads the peak RSS over the timed ones."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.times: list[float] = []
        self.started = 0.0
        self.peak_rss_mb = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            _reset_peak_rss()
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step > self.warmup:
            self.times.append(time.perf_counter() - self.started)
            self.peak_rss_mb = _peak_rss_mb()


def _trl_template(name: str) -> str:
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / name).read_text()


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
