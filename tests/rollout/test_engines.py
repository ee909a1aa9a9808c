"""Rollout engines through the single-turn agent loop: sampling parameters, the HF engine (masking,
seeding, greedy parity, suppression, top-p), the scripted engine and the engine registry."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from PIL import Image

from vlreason.data.batch import Media
from vlreason.models import TINY_PRESETS
from vlreason.models.adapters import QWEN2_VL, TEXT_SPECIAL_TOKENS, VISION_SPECIAL_TOKENS
from vlreason.models.tiny import tiny_tokenizer
from vlreason.models.vlm import build_tiny_vlm
from vlreason.registry import PluginError
from vlreason.rewards import PredBox, parsed_columns
from vlreason.rollout import (
    ENGINES,
    AgentLoop,
    HFEngine,
    SamplingParams,
    ScriptedEngine,
    Trajectories,
    build_engine,
    encode_prompts,
)
from vlreason.rollout.hf import pick_tokens, sample_rows
from vlreason.vision.images import ImageInfo


def ask(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def sharpened_vlm(preset: str):
    """A tiny model whose language weights are scaled up, so its outputs depend on the input (at the
    default initialisation every prompt greedily repeats one token)."""
    vlm = build_tiny_vlm(preset, seed=0)
    with torch.no_grad():
        for name, param in vlm.model.named_parameters():
            if "language_model" in name and "norm" not in name:
                param.mul_(6.0)
    vlm.model.eval()
    return vlm


def encode_two(vlm):
    """Two prompts of different lengths (the first is left-padded)."""
    images = [[Image.new("RGB", (64, 48), (200, 30, 30))], [Image.new("RGB", (90, 60), (0, 100, 0))]]
    return encode_prompts(vlm, [ask("q"), ask("where is the green square?")], [Media(row) for row in images])


def generate(vlm, engine, prompts, params) -> Trajectories:
    """One model turn per row, as GRPO samples without tools."""
    return AgentLoop(vlm, engine).run(prompts, params)


@pytest.fixture(scope="module")
def vlm():
    return sharpened_vlm("tiny-qwen2.5-vl")


@pytest.fixture(scope="module")
def inputs(vlm):
    return encode_two(vlm)


class CallHook:
    """Forward hook on ``lm_head`` that edits the ``[rows, V]`` next-token logits of call k (the
    engine asks for them once per generated token: call k decides generated token k)."""

    def __init__(self, edit):
        self.edit = edit
        self.calls = 0

    def __call__(self, module, args, output):
        self.edit(self.calls, output)
        self.calls += 1
        return output


def with_hook(vlm, edit, run):
    handle = vlm.model.lm_head.register_forward_hook(CallHook(edit))
    try:
        return run()
    finally:
        handle.remove()


# ---- SamplingParams -----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 0}, "must be >= 1"),
    ({"max_new_tokens": 0}, "must be >= 1"),
    ({"temperature": -0.1}, "temperature >= 0"),
    ({"top_p": 0.0}, "0 < top_p <= 1"),
    ({"top_p": 1.5}, "0 < top_p <= 1"),
    ({"temperature": 0.0, "n": 2}, "greedy"),
])
def test_sampling_params_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_accepts_greedy_single_and_is_frozen():
    params = SamplingParams(n=1, temperature=0.0, top_p=1.0, max_new_tokens=1)
    assert params.temperature == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.n = 3  # type: ignore[misc]


# ---- finish -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def decoder():
    """The loop's decoding of model tokens, on the tiny tokenizer."""
    return AgentLoop(build_tiny_vlm("tiny-qwen2-vl"), None)


def test_decoding_drops_padding_eos_and_chat_tokens(tokenizer, decoder):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert decoder.decode(token_ids(tokenizer, "abcd") + [eos, pad]) == "abcd"
    assert decoder.decode([eos]) == ""


def test_qwen2_vl_box_output_reaches_the_rewards(tokenizer, decoder):
    # Qwen2-VL's native grounding output, written with its special tokens; a stray chat and a
    # vision token in the middle carry no meaning and are dropped, as are EOS and padding
    answer = "<|object_ref_start|>cat<|object_ref_end|><|box_start|>(100,200),(500,1000)<|box_end|>"
    ids = token_ids(tokenizer, "<|im_start|>" + answer + "<|vision_end|><|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>"
    texts = [decoder.decode(ids)]
    assert texts == [answer]
    info = ImageInfo(original_size=(640, 480), input_size=(644, 476))
    columns = parsed_columns(texts, [[info.original_size]], [lambda c: QWEN2_VL.from_model(c, info)], [False])
    # relative 0..1000 -> pixels: 100*.64, 200*.48, 500*.64, 1000*.48
    assert columns["pred_boxes"] == [[PredBox((64.0, 96.0, 320.0, 480.0), "cat", None)]]


def test_decoding_keeps_quad_tokens(tokenizer, decoder):
    text = "<|quad_start|>(1,2),(3,4),(5,6),(7,8)<|quad_end|>"
    assert decoder.decode(token_ids(tokenizer, text + tokenizer.eos_token)) == text


# ---- HFEngine -----------------------------------------------------------------------------------


def check_rollouts(rollouts: Trajectories, rows: int, max_new_tokens: int, eos_id: int, pad_id: int, tokenizer):
    ids, mask = rollouts.ids, rollouts.loss_mask
    assert torch.equal(rollouts.attention_mask, mask)  # one turn: every token is the model's
    assert ids.shape == mask.shape and ids.shape[0] == rows and ids.shape[1] <= max_new_tokens
    for row in range(rows):
        tokens = ids[row].tolist()
        ends = [i for i, t in enumerate(tokens) if t == eos_id]
        length = ends[0] + 1 if ends else len(tokens)
        assert mask[row].tolist() == [1] * length + [0] * (len(tokens) - length)
        assert tokens[length:] == [pad_id] * (len(tokens) - length)
        assert bool(rollouts.truncated[row]) == (not ends)
    dropped = {i for i, token in tokenizer.added_tokens_decoder.items()
               if token.special and token.content not in TEXT_SPECIAL_TOKENS}
    assert rollouts.texts == tokenizer.batch_decode([[t for t in row if t not in dropped] for row in ids.tolist()])


def test_hf_engine_masks_after_eos_and_flags_truncation(vlm, inputs):
    eos, pad = vlm.tokenizer.eos_token_id, vlm.tokenizer.pad_token_id
    stops = {0: 2, 3: 4}  # row -> the step at which it is forced to write EOS; other rows never end

    def edit(call, logits):
        if call == 0:  # the prompt pass: rows are prompts, not yet repeated
            logits[:, eos] = -1e9
            return
        for row in range(logits.shape[0]):
            logits[row, eos] = 1e9 if stops.get(row) == call else -1e9

    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=6, seed=0)
    rollouts = with_hook(vlm, edit, lambda: generate(vlm, HFEngine(vlm), inputs, params))
    assert rollouts.ids.shape == (6, 6)
    check_rollouts(rollouts, 6, 6, eos, pad, vlm.tokenizer)
    assert rollouts.lengths.tolist() == [3, 6, 6, 5, 6, 6]
    assert rollouts.truncated.tolist() == [False, True, True, False, True, True]
    assert rollouts.ids[0, 2] == eos and (rollouts.ids[0, 3:] == pad).all()
    assert rollouts.ids[3, 4] == eos and rollouts.ids[3, 5] == pad


def test_hf_engine_stops_early_when_every_row_ended(vlm, inputs):
    eos = vlm.tokenizer.eos_token_id

    def edit(call, logits):
        if call == 1:
            logits[:, eos] = 1e9

    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=10, seed=0)
    rollouts = with_hook(vlm, edit, lambda: generate(vlm, HFEngine(vlm), inputs, params))
    assert rollouts.ids.shape == (4, 2)
    assert (rollouts.ids[:, 1] == eos).all()
    assert rollouts.loss_mask.tolist() == [[1, 1]] * 4
    assert not rollouts.truncated.any()


def test_hf_engine_unconstrained_rollouts_are_consistent(vlm, inputs):
    params = SamplingParams(n=4, temperature=1.5, max_new_tokens=8, seed=3)
    rollouts = generate(vlm, HFEngine(vlm), inputs, params)
    check_rollouts(rollouts, 8, 8, vlm.tokenizer.eos_token_id, vlm.tokenizer.pad_token_id, vlm.tokenizer)


def test_hf_engine_same_seed_same_rollouts_other_seed_differs(vlm, inputs):
    engine = HFEngine(vlm)
    first = generate(vlm, engine, inputs, SamplingParams(n=3, temperature=1.0, max_new_tokens=6, seed=11))
    again = generate(vlm, engine, inputs, SamplingParams(n=3, temperature=1.0, max_new_tokens=6, seed=11))
    other = generate(vlm, engine, inputs, SamplingParams(n=3, temperature=1.0, max_new_tokens=6, seed=12))
    assert torch.equal(first.ids, again.ids)
    assert torch.equal(first.loss_mask, again.loss_mask)
    assert first.texts == again.texts
    assert not torch.equal(first.ids, other.ids)
    # the G samples of one prompt are not copies of each other
    assert len({tuple(row) for row in first.ids[:3].tolist()}) > 1


@pytest.mark.parametrize("preset", list(TINY_PRESETS))
def test_hf_engine_greedy_equals_vlm_generate(preset):
    vlm = sharpened_vlm(preset)
    inputs = encode_two(vlm)
    steps = 7
    rollouts = generate(vlm, HFEngine(vlm), inputs, SamplingParams(n=1, temperature=0.0, max_new_tokens=steps))
    reference = vlm.generate(inputs.inputs, do_sample=False, max_new_tokens=steps)
    assert torch.equal(rollouts.ids, reference)
    assert len(set(reference[0].tolist())) > 1  # not a degenerate repeated token
    assert not torch.equal(reference[0], reference[1])  # the prompt matters


def test_hf_engine_never_samples_vision_tokens(vlm, inputs):
    vision_ids = torch.tensor(vlm.tokenizer.convert_tokens_to_ids(list(VISION_SPECIAL_TOKENS)))

    def favour_vision(call, logits):
        logits[:, vision_ids] += 50.0  # the model's overwhelming choice

    engine = HFEngine(vlm)
    assert sorted(engine.suppress.tolist()) == sorted(vision_ids.tolist())
    params = SamplingParams(n=8, temperature=1.0, max_new_tokens=5, seed=0)
    rollouts = with_hook(vlm, favour_vision, lambda: generate(vlm, engine, inputs, params))
    assert rollouts.ids.numel() == 16 * 5
    assert not torch.isin(rollouts.ids, vision_ids).any()

    # control: without suppression the hook makes the first token a vision token every time
    engine.suppress = torch.tensor([], dtype=torch.long)
    one_step = SamplingParams(n=16, temperature=1.0, max_new_tokens=1, seed=0)
    unsuppressed = with_hook(vlm, favour_vision, lambda: generate(vlm, engine, inputs, one_step))
    assert torch.isin(unsuppressed.ids, vision_ids).all()


# ---- pick_tokens --------------------------------------------------------------------------------


def test_pick_tokens_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, -1.0, 4.9]])
    assert pick_tokens(logits, temperature=0.0, top_p=1.0).tolist() == [1, 0]


def test_pick_tokens_small_top_p_keeps_only_the_argmax():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        picked = pick_tokens(logits, temperature=1.0, top_p=1e-3, generator=generator)
        assert torch.equal(picked, logits.argmax(dim=-1))


def test_pick_tokens_never_leaves_the_nucleus():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log().expand(4000, -1).clone()
    picked = pick_tokens(logits, temperature=1.0, top_p=0.6, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(picked, minlength=4).tolist()
    assert counts[2] == counts[3] == 0  # mass before them (0.7, 0.9) already reaches 0.6
    assert counts[0] > 0 and counts[1] > 0
    assert counts[0] / 4000 == pytest.approx(0.4 / 0.7, abs=0.04)  # renormalised inside the nucleus
    # top_p 1 samples from the whole distribution, with the right frequencies
    full = pick_tokens(logits, temperature=1.0, top_p=1.0, generator=torch.Generator().manual_seed(0))
    frequencies = torch.bincount(full, minlength=4).float() / 4000
    torch.testing.assert_close(frequencies, probs, atol=0.03, rtol=0)


def test_pick_tokens_temperature_sharpens():
    logits = torch.tensor([[math.log(0.6), math.log(0.4)]]).expand(4000, -1)
    cold = pick_tokens(logits, temperature=0.25, top_p=1.0, generator=torch.Generator().manual_seed(0))
    # softmax(log p / 0.25) = p^4 / sum: 0.6^4 / (0.6^4 + 0.4^4) ~ 0.835
    assert (cold == 0).float().mean().item() == pytest.approx(0.6**4 / (0.6**4 + 0.4**4), abs=0.03)


def test_sample_rows_never_picks_a_zero_weight_and_keeps_the_proportions():
    weights = torch.tensor([0.0, 1.0, 0.0, 0.0, 2.0, 0.0]).expand(30_000, -1)
    picked = sample_rows(weights, torch.Generator().manual_seed(3))
    counts = torch.bincount(picked, minlength=6)
    assert counts[[0, 2, 3, 5]].sum() == 0
    assert counts[4] / 30_000 == pytest.approx(2 / 3, abs=0.01)


def test_pick_tokens_seeded_generator_reproduces():
    logits = torch.randn(32, 100, generator=torch.Generator().manual_seed(0))
    a = pick_tokens(logits, 1.0, 0.9, torch.Generator().manual_seed(5))
    b = pick_tokens(logits, 1.0, 0.9, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


# ---- ScriptedEngine -----------------------------------------------------------------------------


def test_scripted_engine_cycles_rows_and_calls(vlm, inputs):
    engine = ScriptedEngine(vlm, ["alpha", "beta", "gamma"])
    first = generate(vlm, engine, inputs, SamplingParams(n=2, max_new_tokens=32))  # 4 rows
    assert first.texts == ["alpha", "beta", "gamma", "alpha"]
    second = generate(vlm, engine, inputs, SamplingParams(n=1, max_new_tokens=32))  # 2 rows, cursor continues
    assert second.texts == ["beta", "gamma"]
    assert not first.truncated.any()


def test_scripted_engine_ids_end_with_eos_and_round_trip(vlm, inputs):
    tokenizer = vlm.tokenizer
    texts = ["<think>a box</think><answer>[1, 2, 30, 40]</answer>", "short"]
    rollouts = generate(vlm, ScriptedEngine(vlm, texts), inputs, SamplingParams(n=1, max_new_tokens=64))
    assert rollouts.texts == texts
    for row, text in enumerate(texts):
        expected = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        length = int(rollouts.lengths[row])
        assert rollouts.ids[row, :length].tolist() == expected
        assert (rollouts.ids[row, length:] == tokenizer.pad_token_id).all()
    assert rollouts.ids.shape[1] == max(rollouts.lengths.tolist())


def test_scripted_engine_truncates_at_max_new_tokens(vlm, inputs):
    long_text = "one two three four five six seven eight nine ten"
    rollouts = generate(vlm, ScriptedEngine(vlm, [long_text, "ok"]), inputs, SamplingParams(n=1, max_new_tokens=4))
    assert rollouts.ids.shape == (2, 4)
    assert rollouts.truncated.tolist() == [True, False]
    assert rollouts.lengths.tolist()[0] == 4
    assert vlm.tokenizer.eos_token_id not in rollouts.ids[0].tolist()
    assert long_text.startswith(rollouts.texts[0]) and rollouts.texts[0] != long_text
    assert rollouts.texts[1] == "ok"


def test_scripted_engine_needs_completions(vlm):
    with pytest.raises(ValueError, match="at least one completion"):
        ScriptedEngine(vlm, [])


# ---- registry -----------------------------------------------------------------------------------


def test_engine_registry_resolves_builtins(vlm, inputs):
    assert ENGINES.resolve("hf") is HFEngine
    assert ENGINES.resolve("scripted") is ScriptedEngine
    assert {"hf", "scripted"} <= set(ENGINES.names())
    engine = build_engine("scripted", vlm, completions=["x"])
    assert isinstance(engine, ScriptedEngine)
    assert generate(vlm, engine, inputs, SamplingParams(n=1)).texts == ["x", "x"]
    assert isinstance(build_engine("hf", vlm), HFEngine)


def test_engine_registry_unknown_name_suggests():
    with pytest.raises(PluginError, match=r"unknown rollout engine 'hff'; did you mean hf\?") as info:
        ENGINES.resolve("hff")
    assert "scripted" in str(info.value)
    with pytest.raises(PluginError, match="did you mean scripted"):
        build_engine("scriptd", None)
