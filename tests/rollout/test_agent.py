"""The agent loop: scripted multi-turn trajectories (exact ids, loss mask, images for the training
forward, tool trace, budgets and errors) and the HF engine's multi-turn sampling (its log-probs are
the training forward's)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from PIL import Image, ImageDraw

from vlreason.data.batch import Media
from vlreason.models.prefix import CompletionScorer, completion_logprobs, full_hidden
from vlreason.models.vlm import build_tiny_vlm
from vlreason.rl import LossAggregation, policy_loss
from vlreason.rollout import (
    AgentLoop,
    GroundingAgent,
    HFEngine,
    SamplingParams,
    ScriptedEngine,
    StopReason,
    ToolAgent,
    encode_prompts,
)
from vlreason.tools import ToolContext, get_tool, register_tool
from vlreason.vision.crops import CropError, crop_region

QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the dot?"}]}]


def call(name: str, **arguments) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def scene() -> Image.Image:
    image = Image.new("RGB", (400, 300), (240, 240, 240))
    ImageDraw.Draw(image).ellipse([200, 100, 220, 120], fill=(220, 40, 40))
    return image


@register_tool("explode")
def explode(context: ToolContext, power: int) -> str:
    """A tool with a bug.

    Args:
        power: how hard.
    """
    raise RuntimeError(f"boom {power}")


@pytest.fixture(scope="module")
def vlm():
    return build_tiny_vlm("tiny-qwen2.5-vl", seed=0)


def run(vlm, scripts, agent=None, n=1, **budgets):
    prompts = encode_prompts(vlm, [QUESTION], [Media([scene()])], agent.schemas() if agent else None)
    loop = AgentLoop(vlm, ScriptedEngine(vlm, scripts), agent, **budgets)
    return prompts, loop.run(prompts, SamplingParams(n=n, max_new_tokens=64))


def tokens(vlm, text: str) -> list[int]:
    return vlm.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_scripted_three_turn_trajectory_token_by_token(vlm):
    crop = get_tool("crop")
    box = [100, 50, 150, 90]  # Qwen2.5-VL: pixels of the model input
    turns = [f"<think>zoom</think>{call('crop', bbox_2d=box)}", "<tool_call>{not json</tool_call>",
             "<think>red</think><answer>red</answer>"]
    prompts, out = run(vlm, [turns], ToolAgent([crop]), max_turns=3)
    eos = vlm.tokenizer.eos_token
    # what the family's template renders after each assistant turn: the tool reply, then the next header
    cropped = crop(ToolContext(prompts.images[0], prompts.infos[0], vlm.adapter, vlm.resize), {"bbox_2d": box})
    first_obs, first_pixels, _ = vlm.encode_observation(vlm.adapter.render_continuation(
        [{"role": "tool", "content": [{"type": "image"}]}]), cropped.images)
    error = out.tool_calls[0][1]["error"]
    second_obs, second_pixels, _ = vlm.encode_observation(vlm.adapter.render_continuation(
        [{"role": "tool", "content": [{"type": "text", "text": f"Error: {error}"}]}]), [])
    model = [tokens(vlm, turn + eos) for turn in turns]
    expected = model[0] + first_obs + model[1] + second_obs + model[2]
    assert out.ids[0].tolist() == expected
    assert out.loss_mask[0].tolist() == [1] * len(model[0]) + [0] * len(first_obs) + [1] * len(model[1]) + [
        0] * len(second_obs) + [1] * len(model[2])
    assert out.attention_mask[0].tolist() == [1] * len(expected)
    # the observation holds the crop's image pads; the training forward gets exactly its pixels
    image_pad = vlm.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    grid = first_pixels["image_grid_thw"]
    assert first_obs.count(image_pad) == int(grid.prod()) // vlm.adapter.merge_size**2
    assert not second_pixels
    continuation = out.continuation(slice(0, 1))
    assert continuation.images_per_row == [1]
    assert torch.equal(continuation.pixel_values, first_pixels["pixel_values"])
    assert torch.equal(continuation.image_grid_thw, grid)
    # the trace
    assert out.stops == [StopReason.END] and out.texts == [turns[2]]
    spans = out.turns[0]
    assert [out.ids[0, a:b].tolist() for a, b in spans] == model
    assert [c["name"] for c in out.tool_calls[0]] == ["crop", None]
    assert out.tool_calls[0][0]["error"] is None and "JSON" in error or "json" in error
    assert out.reward_columns() == {"tool_calls": out.tool_calls, "tool_errors": [1], "turns": [3], "images_seen": [1],
                                    "images_dropped": [0]}


def test_tool_output_tokens_are_outside_the_loss(vlm):
    """The loss reads model tokens only: whatever the log-probs of observation tokens, it is the same."""
    turns = [call("crop", bbox_2d=[10, 10, 60, 60]), "<answer>red</answer>"]
    prompts, out = run(vlm, [turns], ToolAgent([get_tool("crop")]), n=2, max_turns=2)
    scorer = CompletionScorer(vlm.model, temperature=1.0)
    logp, _ = scorer(prompts.inputs, out.continuation(slice(0, 2)), 2, [1])
    mask = out.loss_mask
    assert (mask == 0).logical_and(out.attention_mask == 1).any()  # observations present

    old = logp.detach() - 0.1  # a ratio away from 1, so clipping is in play

    def loss(values):
        return policy_loss(values, old, torch.tensor([1.0, -0.5]), mask, epsilon_low=0.2, epsilon_high=0.2,
                           aggregation=LossAggregation.TOKEN_MEAN, max_tokens=64).loss

    noisy = torch.where(mask.bool(), logp, logp + torch.randn_like(logp) * 5)
    assert float(loss(noisy).detach()) == pytest.approx(float(loss(logp).detach()), abs=1e-7)
    grad = torch.autograd.grad(loss(logp), logp)[0]
    assert (grad[mask == 0] == 0).all() and (grad[mask == 1] != 0).any()


def test_errors_become_observations_never_exceptions(vlm):
    turns = [call("nope"), call("crop", bbox_2d=[1, 2]), call("crop", box=[1, 2, 3, 4]), call("explode", power=3),
             call("crop", bbox_2d=[50, 50, 10, 10]), "<answer>red</answer>"]
    agent = ToolAgent([get_tool("crop"), get_tool("explode")])
    _, out = run(vlm, [turns], agent, max_turns=6, max_tokens=4096)
    errors = [c["error"] for c in out.tool_calls[0]]
    assert len(errors) == 5 and all(errors)
    assert "unknown tool 'nope'" in errors[0] and "crop, explode" in errors[0]
    assert "4 numbers" in errors[1]
    assert "box" in errors[2]
    assert "explode failed: RuntimeError: boom 3" in errors[3]
    assert out.stops == [StopReason.END] and out.reward_columns()["tool_errors"] == [5]
    text = AgentLoop(vlm, None).decode(out.ids[0].tolist())
    assert "Error: unknown tool 'nope'" in text  # the model reads what went wrong


def test_budgets_end_trajectories_cleanly_with_their_reason(vlm):
    agent = ToolAgent([get_tool("crop")])
    zoom = call("crop", bbox_2d=[10, 10, 60, 60])
    _, turns_out = run(vlm, [[zoom]], agent, max_turns=2)  # keeps calling: the second call is the last turn
    assert turns_out.stops == [StopReason.TURNS] and len(turns_out.turns[0]) == 2
    assert len(turns_out.tool_calls[0]) == 1  # the last turn's call is not run
    _, context = run(vlm, [[zoom, "<answer>x</answer>"]], agent, max_turns=3, max_tokens=40)
    assert context.stops == [StopReason.CONTEXT] and len(context.turns[0]) == 1
    assert context.ids.shape[1] < 40
    _, long = run(vlm, [["word " * 100]], agent, max_turns=3)
    assert long.stops == [StopReason.TOKENS] and bool(long.truncated[0])
    _, images = run(vlm, [[zoom, zoom, "<answer>x</answer>"]], agent, max_turns=3, max_images=1)
    assert images.reward_columns()["images_seen"] == [1]
    assert "only 0 more fit" in images.tool_calls[0][1]["error"]


def test_rows_stop_at_different_turns_in_one_batch(vlm):
    agent = ToolAgent([get_tool("crop")])
    zoom = call("crop", bbox_2d=[10, 10, 60, 60])
    scripts = [["<answer>a</answer>"], [zoom, "<answer>b</answer>"], [zoom, zoom, "<answer>c</answer>"]]
    _, out = run(vlm, scripts, agent, n=3, max_turns=4)
    assert [len(spans) for spans in out.turns] == [1, 2, 3]
    assert out.texts == ["<answer>a</answer>", "<answer>b</answer>", "<answer>c</answer>"]
    assert [len(p["image_grid_thw"]) if p else 0 for p in out.pixels] == [0, 1, 2]
    assert out.continuation(slice(0, 3)).images_per_row == [0, 1, 2]


def test_grounding_mode_shows_the_crop_or_the_whole_image(vlm):
    prompts, out = run(vlm, [["[100, 50, 150, 90]", "<answer>red</answer>"], ["no box", "<answer>?</answer>"]],
                       GroundingAgent("Answer now."), n=2, max_turns=2)
    assert [len(spans) for spans in out.turns] == [2, 2]
    good, bad = out.tool_calls[0][0], out.tool_calls[1][0]
    assert good["error"] is None and bad["error"].startswith("no valid box")
    box = vlm.adapter.from_model([100, 50, 150, 90], prompts.infos[0][0])
    assert out.images[0][0].size == crop_region(prompts.images[0][0], box, vlm.resize).size
    assert out.images[1][0] is prompts.images[0][0]  # the original, when the box is unusable


class EndsAt:
    """A hook on the LM head: end-of-sequence is never the model's choice, except where a row is
    forced to end its turn (``ends``: row -> sampling steps, counted per call while ``sampling``).
    Vision tokens are ruled out as the sampler rules them out, so both passes score the
    distribution sampled from."""

    def __init__(self, vlm, ends: dict[int, list[int]]):
        self.eos, self.ends, self.calls, self.sampling = vlm.tokenizer.eos_token_id, ends, 0, True
        self.never = vlm.adapter.suppress_token_ids(vlm.tokenizer) + [self.eos]

    def __call__(self, module, args, output):
        output[..., self.never] = -1e9
        if self.sampling:
            for row, steps in self.ends.items():
                if row < output.shape[0] and self.calls in steps:
                    output[row, self.eos] = 1e9
            self.calls += 1
        return output


@pytest.mark.parametrize(("preset", "device"), [("tiny-qwen2-vl", "cpu"), ("tiny-qwen2.5-vl", "cpu"),
                                                ("tiny-qwen3-vl", "cpu"),
                                                pytest.param("tiny-qwen3-vl", "cuda", marks=pytest.mark.gpu)])
def test_hf_multi_turn_sampling_logprobs_equal_the_training_forward(preset, device):
    """Rows end their first turn at different steps (the finished ones wait, masked), get a crop
    with its pixels and sample again from the kept cache: the sampler's log-probs are the ones
    one forward over the finished trajectories gives."""
    vlm = build_tiny_vlm(preset, seed=0)
    vlm.model.to(device).eval()
    prompts = encode_prompts(vlm, [QUESTION, QUESTION], [Media([scene()]), Media([scene().rotate(90, expand=True)])])
    hook = EndsAt(vlm, {0: [2], 1: [5], 2: [3], 3: [1]})
    handle = vlm.model.lm_head.register_forward_hook(hook)
    try:
        loop = AgentLoop(vlm, HFEngine(vlm), GroundingAgent(), max_turns=2, max_tokens=200)
        out = loop.run(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=0))
        hook.sampling = False
        with torch.no_grad():
            continuation = out.continuation(slice(0, 4)).to(device)
            logp, _ = CompletionScorer(vlm.model, 1.0)(prompts.inputs.to(device), continuation, 2, [1, 1])
    finally:
        handle.remove()
    assert [len(spans) for spans in out.turns] == [2, 2, 2, 2] and out.logprobs is not None
    assert [b - a for a, b in (spans[0] for spans in out.turns)] == [3, 6, 4, 2]
    assert out.stops == [StopReason.TOKENS] * 4  # the second turns ran out of tokens
    free = out.loss_mask.bool() & (out.ids != vlm.tokenizer.eos_token_id)  # forced tokens aside
    torch.testing.assert_close(out.logprobs[free], logp.cpu()[free], atol=2e-4, rtol=1e-4)


def test_an_impossible_crop_is_a_crop_error():
    with pytest.raises(CropError):
        crop_region(scene(), (10.0, 10.0, 5.0, 5.0), build_tiny_vlm("tiny-qwen2-vl").resize)


class Writes:
    """A hook on the LM head: while ``session`` samples its first ``len(turns)`` turns, every row
    writes that turn's tokens; later turns are free. Vision tokens are ruled out in every pass,
    as the sampler rules them out, so sampling and scoring see one distribution."""

    def __init__(self, vlm, turns: list[list[int]]):
        self.turns, self.session, self.step = turns, None, 0
        self.never = vlm.adapter.suppress_token_ids(vlm.tokenizer)

    def attach(self, engine):
        """Follow the sessions ``engine`` starts (the step count restarts with every turn)."""
        start = engine.start

        def started(prompts, params):
            self.session = session = start(prompts, params)
            sample = session.sample
            session.sample = lambda budgets: setattr(self, "step", 0) or sample(budgets)
            return session

        engine.start = started
        return engine

    def __call__(self, module, args, output):
        output[..., self.never] = -1e9
        if self.session is not None and self.session.turn < len(self.turns):
            written = self.turns[self.session.turn]
            output[..., written[min(self.step, len(written) - 1)]] = 1e9
            self.step += 1
        return output


@pytest.mark.parametrize(("preset", "device"), [("tiny-qwen2-vl", "cpu"), ("tiny-qwen3-vl", "cpu"),
                                                pytest.param("tiny-qwen2.5-vl", "cuda", marks=pytest.mark.gpu)])
def test_images_out_of_the_memory_window_are_out_of_view_in_sampling_and_scoring(preset, device):
    """Three crops through a one-image window: each call takes the previous crop out of view. The
    free last turn's sampling log-probs are what both training forwards give (the cached one cut
    at the window's changes, and the one-pass one with a 4-D mask), and differ from scoring the
    same tokens with every crop still in view."""
    vlm = build_tiny_vlm(preset, seed=0)
    vlm.model.to(device).eval()
    eos = [vlm.tokenizer.eos_token_id]
    calls = [call("crop", bbox_2d=box) for box in ([0, 0, 100, 80], [100, 0, 200, 80], [0, 80, 100, 160])]
    hook = Writes(vlm, [tokens(vlm, text) + eos for text in calls])
    agent = ToolAgent([get_tool("crop")])
    prompts = encode_prompts(vlm, [QUESTION, QUESTION], [Media([scene()]), Media([scene().rotate(90, expand=True)])],
                             agent.schemas())
    handle = vlm.model.lm_head.register_forward_hook(hook)
    try:
        loop = AgentLoop(vlm, hook.attach(HFEngine(vlm)), agent, max_turns=4, max_tokens=4000, memory_window=1)
        out = loop.run(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=40, seed=0))
        hook.session = None
        with torch.no_grad():
            continuation = out.continuation(slice(0, 4)).to(device)
            cached, _ = CompletionScorer(vlm.model, 1.0)(prompts.inputs.to(device), continuation, 2, [1, 1])
            inputs = prompts.inputs.to(device)
            one_pass, _ = completion_logprobs(vlm.model, full_hidden(vlm.model, inputs, continuation, 2, [1, 1]),
                                              continuation.input_ids)
            in_view, _ = CompletionScorer(vlm.model, 1.0)(inputs, replace(continuation, hidden=None), 2, [1, 1])
    finally:
        handle.remove()
    assert [call["error"] for row in out.tool_calls for call in row] == [None] * 12
    assert out.reward_columns()["images_dropped"] == [2] * 4
    text = AgentLoop(vlm, None).decode(out.ids[0].tolist())
    assert text.count("Out of view now") == 2 and 'crop {"bbox_2d": [100, 0, 200, 80]}' in text
    last = torch.zeros_like(out.loss_mask, dtype=torch.bool)  # the free turn
    for row, spans in enumerate(out.turns):
        assert len(spans) == 4
        last[row, spans[-1][0]:spans[-1][1]] = True
    torch.testing.assert_close(out.logprobs[last], cached.cpu()[last], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(one_pass.cpu()[last], cached.cpu()[last], atol=2e-4, rtol=1e-4)
    assert float((in_view.cpu()[last] - cached.cpu()[last]).abs().max()) > 1e-3
