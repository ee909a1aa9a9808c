"""Rollout speed of the vLLM engine against the HF engine, and the cost of one weight push.

Side by side in one run, on the same random-weight tiny Qwen2.5-VL the GRPO benchmark uses
(language 256 x 4, vision 96 x 2, 448 px images: 256 image tokens), fp32: 4 prompts x G = 8
samples x 64 new tokens (temperature 1, each row seeded). Each engine is warmed up once, then
``AgentLoop.run`` is timed ``--repeats`` times (median). A random model rarely ends a turn
early, so both write about 4 x 8 x 64 tokens; the tokens actually written are counted.

``weight_push`` times ``update_weights`` + the push at the next session's start (vLLM's in-place
``reload_weights``, the CPU head repack and the cache resets), from the trained model's
parameters.

On CPU this is indicative only (vLLM's CPU kernels against PyTorch's); it needs vLLM, so it runs
in the `make test-vllm` virtualenv:

    .venv-vllm/bin/python benchmarks/vllm_rollouts.py --json benchmarks/results/vllm_rollouts.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from vlreason.data.batch import Media
from vlreason.models.tiny import TinySpec
from vlreason.models.vlm import build_tiny_vlm
from vlreason.rollout import AgentLoop, HFEngine, SamplingParams, encode_prompts
from vlreason.rollout.vllm import VLLMEngine

PROMPTS, GROUP, NEW_TOKENS, IMAGE_SIDE = 4, 8, 64, 448
SPEC = TinySpec(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=768,
                vision_hidden_size=96, vision_layers=2, vision_heads=2, min_tokens=4, max_tokens=256)
QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the shape?"}]}]


def scene(index: int) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), (235, 235, 235))
    ImageDraw.Draw(image).rectangle([40 + 60 * index, 80, 160 + 60 * index, 220], fill=(200, 30, 30))
    return image


def timed_rollouts(vlm, engine, prompts, repeats: int) -> dict[str, float]:
    """Median seconds of one rollout of all rows, and model tokens per second."""
    loop = AgentLoop(vlm, engine)
    params = SamplingParams(n=GROUP, temperature=1.0, max_new_tokens=NEW_TOKENS, seed=0)
    loop.run(prompts, params)  # warm-up
    seconds, tokens = [], 0
    for repeat in range(repeats):
        started = time.perf_counter()
        out = loop.run(prompts, SamplingParams(n=GROUP, temperature=1.0, max_new_tokens=NEW_TOKENS, seed=repeat))
        seconds.append(time.perf_counter() - started)
        tokens = int(out.lengths.sum())
    median = statistics.median(seconds)
    return {"seconds": round(median, 4), "tokens": tokens, "tokens_per_s": round(tokens / median, 1)}


def weight_push(vlm, engine, prompts, repeats: int) -> dict[str, float]:
    """Median seconds of one push of the trained weights (and how many bytes they are)."""
    seconds = []
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=1, seed=0)
    for _ in range(repeats):
        with torch.no_grad():
            for parameter in vlm.model.parameters():
                parameter.mul_(1.0001)  # a stand-in optimizer step
        engine.update_weights(vlm.model)
        AgentLoop(vlm, engine).run(prompts, params)
        seconds.append(engine.sync_s)
    size = sum(p.numel() * p.element_size() for p in vlm.model.parameters())
    return {"seconds": round(statistics.median(seconds), 4), "megabytes": round(size / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    torch.manual_seed(0)
    vlm = build_tiny_vlm("tiny-qwen2.5-vl", spec=SPEC, seed=0)
    vlm.model.eval()
    prompts = encode_prompts(vlm, [QUESTION] * PROMPTS, [Media([scene(i)]) for i in range(PROMPTS)])
    started = time.perf_counter()
    engine = VLLMEngine(vlm, max_model_len=2048)
    start_s = time.perf_counter() - started
    with torch.no_grad():
        hf = timed_rollouts(vlm, HFEngine(vlm), prompts, args.repeats)
        vllm = timed_rollouts(vlm, engine, prompts, args.repeats)
    push = weight_push(vlm, engine, prompts, args.repeats)
    import vllm as vllm_module

    result = {
        "command": "python benchmarks/vllm_rollouts.py --json benchmarks/results/vllm_rollouts.json",
        "setup": {"prompts": PROMPTS, "group": GROUP, "max_new_tokens": NEW_TOKENS, "image_side": IMAGE_SIDE,
                  "model": "tiny-qwen2.5-vl 256x4 / vision 96x2, fp32", "device": "cpu",
                  "threads": torch.get_num_threads(), "repeats": args.repeats},
        "hf_engine": hf,
        "vllm_engine": {**vllm, "start_s": round(start_s, 1)},
        "vllm_over_hf_tokens_per_s": round(vllm["tokens_per_s"] / hf["tokens_per_s"], 2),
        "weight_push": push,
        "versions": {"torch": torch.__version__, "vllm": vllm_module.__version__,
                     "python": platform.python_version()},
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
