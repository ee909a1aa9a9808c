"""Multi-turn tool rollouts against single-turn ones, and where a multi-turn GRPO step spends its time.

The tiny Qwen3-VL (random weights) on the zoom task's 1024 px canvases, 8 prompts x G = 8. The
sampler's next-token choice is fixed (``Forced``), so every row writes the same text and the
multi-turn rollout really calls the crop tool; the model still runs every pass:

* single turn: ``<think>…</think><answer>red</answer>``;
* multi-turn (tool schemas in the system prompt): ``<think>…</think><tool_call>crop</tool_call>``,
  the crop (an image) fed back as a tool reply, then the same answer turn.

``rollout`` times ``AgentLoop.run`` alone (median of ``--repeats``): model tokens per second, and
for the multi-turn rollout also the tokens of the tool replies it fed and the time its agent and
observation encoding took. ``grpo_step`` runs whole GRPO steps on the multi-turn rollouts and
splits each into generation (the model's sampling passes), tool calls with observation encoding,
rewards, the forward/backward passes, and the rest; the target is at most 10 % of a step outside
generation and forward/backward.

    python benchmarks/agent_rollouts.py --json benchmarks/results/agent_rollouts.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from vlreason.config import load_config
from vlreason.data.batch import Media
from vlreason.data.zoom import synthesize_zoom
from vlreason.models.prefix import SharedPrefix
from vlreason.models.vlm import build_tiny_vlm
from vlreason.rollout import AgentLoop, HFEngine, SamplingParams, ToolAgent, encode_prompts
from vlreason.tools import get_tool
from vlreason.training.grpo import GRPOTrainer

PROMPTS, GROUP, MAX_PIXELS = 8, 8, 16384
THINK = "<think>The frame is in the upper left; its dot is small.</think>"
CALL = '<tool_call>\n{"name": "crop", "arguments": {"bbox_2d": [100, 100, 400, 400]}}\n</tool_call>'
ANSWER = "<think>The dot in the frame is red.</think><answer>red</answer>"


class Forced:
    """Makes the model write ``turns`` (one text per turn, every row alike) while it is installed:
    the sampler's next-token logits become a one-hot of the next scripted token, one per step. The
    model still runs every pass; only the choice of token is fixed."""

    def __init__(self, tokenizer, turns: list[str]):
        self.script = [token for turn in turns for token in tokenizer(turn + tokenizer.eos_token,
                                                                      add_special_tokens=False)["input_ids"]]
        self.step = 0

    def __enter__(self) -> Forced:
        original = self.original = SharedPrefix.next_logits

        def next_logits(prefix: SharedPrefix) -> torch.Tensor:
            logits = original(prefix)
            forced = torch.full_like(logits, -1e4)
            forced[:, self.script[self.step % len(self.script)]] = 1e4
            self.step += 1
            return forced

        SharedPrefix.next_logits = next_logits
        return self

    def __exit__(self, *exc: object) -> None:
        SharedPrefix.next_logits = self.original


def rollout(vlm, prompts, agent, turns: list[str], repeats: int) -> dict[str, float]:
    """Median timings of ``repeats`` rollouts writing ``turns``."""
    loop = AgentLoop(vlm, HFEngine(vlm), agent, max_turns=len(turns), max_tokens=1024)
    times, observe = [], []
    for _ in range(repeats + 1):  # the first is a warm-up
        with Forced(vlm.tokenizer, turns):
            started = time.perf_counter()
            out = loop.run(prompts, SamplingParams(n=GROUP, temperature=1.0, max_new_tokens=96, seed=0))
            times.append(time.perf_counter() - started)
            observe.append(loop.observe_s)
    assert all(len(spans) == len(turns) for spans in out.turns), "the forced text did not run every turn"
    seconds = statistics.median(times[1:])
    model_tokens = int(out.loss_mask.sum())
    return {"seconds": round(seconds, 3), "model_tokens": model_tokens,
            "observation_tokens": int(out.attention_mask.sum()) - model_tokens,
            "model_tokens_per_s": round(model_tokens / seconds, 1),
            "agent_and_observation_s": round(statistics.median(observe[1:]), 3)}


def grpo_steps(root: Path, data: Path, steps: int) -> dict[str, float]:
    """Median split of ``steps`` GRPO steps (after a warm-up) on forced two-turn tool rollouts."""
    raw = {"output_dir": str(root / "run"), "model": {"name_or_path": "tiny-qwen3-vl", "max_pixels": MAX_PIXELS,
                                                       "freeze_vision": False},
           "data": {"train": str(data)}, "agent": {"mode": "tools", "tools": ["crop"], "max_turns": 2},
           "stages": [{"kind": "grpo", "optim": {"learning_rate": 1e-4, "batch_size": PROMPTS, "max_steps": steps + 1},
                       "rollout": {"num_generations": GROUP, "max_new_tokens": 96},
                       "rewards": {"classification": {}, "tool_use": {"weight": 0.2}},
                       "logging": {"tensorboard": False, "rollouts_every": 0, "progress": False},
                       "save": {"every": 0}}]}
    trainer = GRPOTrainer(load_config(None, raw=raw).stages[0])
    rows = []
    for step in range(steps + 1):
        with Forced(trainer.vlm.tokenizer, [THINK + CALL, ANSWER]):
            started = time.perf_counter()
            values = trainer.step()
            total = time.perf_counter() - started
        trainer.step_count += 1
        if step:
            rows.append((total, values))
    total = statistics.median(t for t, _ in rows)
    part = {key: statistics.median(v[f"time/{key}"] for _, v in rows) for key in ("generate", "tools", "reward",
                                                                                 "train")}
    sampling = part["generate"] - part["tools"]
    outside = total - sampling - part["train"]
    return {"s_per_step": round(total, 3), "sampling_s": round(sampling, 3), "tools_s": round(part["tools"], 3),
            "reward_s": round(part["reward"], 3), "forward_backward_s": round(part["train"], 3),
            "outside_share": round(outside / total, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, _ = synthesize_zoom(root / "zoom", n=PROMPTS, progress=False)
        lines = [json.loads(line) for line in data.read_text().splitlines()]
        vlm = build_tiny_vlm("tiny-qwen3-vl", max_pixels=MAX_PIXELS)
        vlm.model.eval()
        media = [Media([Image.open(data.parent / line["images"][0]).convert("RGB")]) for line in lines]
        question = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": line["prompt"]}]}]
                    for line in lines]
        agent = ToolAgent([get_tool("crop")])
        with torch.no_grad():
            single = rollout(vlm, encode_prompts(vlm, question, media), None, [THINK + ANSWER], args.repeats)
            multi = rollout(vlm, encode_prompts(vlm, question, media, agent.schemas()), agent,
                            [THINK + CALL, ANSWER], args.repeats)
        step = grpo_steps(root, data, args.steps)
    result = {"single_turn": single, "multi_turn": multi,
              "multi_vs_single_tokens_per_s": round(multi["model_tokens_per_s"] / single["model_tokens_per_s"], 3),
              "grpo_step": step,
              "settings": {"model": "tiny-qwen3-vl", "prompts": PROMPTS, "num_generations": GROUP,
                           "canvas": 1024, "max_pixels": MAX_PIXELS, "threads": torch.get_num_threads(),
                           "device": "cpu"},
              "versions": {"torch": torch.__version__, "python": platform.python_version()}}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
