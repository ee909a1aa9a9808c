"""Shared-prefix scoring: prompt run once, completions fed after its repeated KV cache, must give the
same log-probs (and gradients) as a plain forward over prompt + completion repeated G times."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from vlreason.models import TINY_PRESETS
from vlreason.models.prefix import (
    Continuation,
    SharedPrefix,
    completion_hidden,
    completion_logprobs,
    full_hidden,
    token_entropy,
    token_logprobs,
)
from vlreason.models.vlm import build_tiny_vlm

PRESETS = list(TINY_PRESETS)
GROUP = 3
STEPS = 5


def gradient_image(width: int, height: int, shift: int = 0) -> Image.Image:
    image = Image.new("RGB", (width, height))
    image.putdata([((x * 7 + shift) % 256, (y * 5) % 256, ((x + y) * 3) % 256) for y in range(height)
                   for x in range(width)])
    return image


def ask(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


@pytest.fixture(scope="module", params=PRESETS)
def vlm(request):
    vlm = build_tiny_vlm(request.param, seed=0)
    vlm.model.eval()
    return vlm


def prompts(vlm):
    """Two prompts of different lengths (so the shorter one is left-padded), different image sizes."""
    images = [[gradient_image(64, 48)], [gradient_image(90, 60, shift=40)]]
    inputs, _ = vlm.encode([ask("q"), ask("where is the red square in this picture?")], images)
    assert (inputs["attention_mask"][0] == 0).any()  # left padding present
    return inputs


def completions(vlm, rows: int):
    """Random non-special tokens; every row padded (mask 0) after its own length."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(100, 900, (rows, STEPS), generator=generator)
    lengths = torch.tensor([STEPS, 2, 4, 1, 3, STEPS][:rows])
    mask = (torch.arange(STEPS)[None] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, vlm.tokenizer.pad_token_id)
    return ids, mask


def completion_logits(model, inputs, completion_ids, completion_mask, group: int) -> torch.Tensor:
    """The shared-prefix pass with its whole ``[N, T, V]`` logits (what the chunked path avoids)."""
    return model.get_output_embeddings()(completion_hidden(model, inputs, Continuation(completion_ids, completion_mask),
                                                           group))


def full_forward_logits(vlm, inputs, completion_ids, completion_mask, group: int) -> torch.Tensor:
    """The reference: prompt + completion, every prompt (and its pixels) repeated G times."""
    merge = vlm.adapter.merge_size
    prompt_len = inputs["input_ids"].shape[1]
    input_ids = torch.cat([inputs["input_ids"].repeat_interleave(group, dim=0), completion_ids], dim=1)
    attention = torch.cat([inputs["attention_mask"].repeat_interleave(group, dim=0), completion_mask], dim=1)
    mm_types = torch.cat([inputs["mm_token_type_ids"].repeat_interleave(group, dim=0),
                          torch.zeros_like(completion_ids)], dim=1)
    extra = {}
    if "pixel_values" in inputs:
        start = vlm.tokenizer.convert_tokens_to_ids("<|vision_start|>")
        images_per_row = (inputs["input_ids"] == start).sum(dim=1).tolist()
        per_image = torch.split(inputs["pixel_values"], inputs["image_grid_thw"].prod(dim=1).tolist())
        grids = list(inputs["image_grid_thw"])
        order, first = [], 0
        for count in images_per_row:  # the images of prompt b, once per copy
            order += list(range(first, first + count)) * group
            first += count
        assert first == len(per_image)
        extra = {"pixel_values": torch.cat([per_image[i] for i in order]),
                 "image_grid_thw": torch.stack([grids[i] for i in order])}
        assert int((mm_types == 1).sum()) == int((extra["image_grid_thw"].prod(dim=1) // merge**2).sum())
    logits = vlm.model(input_ids=input_ids, attention_mask=attention, mm_token_type_ids=mm_types, **extra).logits
    return logits[:, prompt_len - 1: prompt_len - 1 + completion_ids.shape[1]]


def test_prefix_logprobs_equal_full_forward(vlm):
    inputs = prompts(vlm)
    ids, mask = completions(vlm, 2 * GROUP)
    with torch.no_grad():
        shared = completion_logits(vlm.model, inputs, ids, mask, GROUP)
        reference = full_forward_logits(vlm, inputs, ids, mask, GROUP)
    assert shared.shape == (2 * GROUP, STEPS, len(vlm.tokenizer))
    on = mask.bool()
    shared_lp, reference_lp = token_logprobs(shared, ids), token_logprobs(reference, ids)
    assert shared_lp.shape == ids.shape
    torch.testing.assert_close(shared_lp[on], reference_lp[on], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared[on], reference[on].float(), atol=1e-5, rtol=1e-5)
    # and with a sampling temperature
    torch.testing.assert_close(token_logprobs(shared, ids, 0.7)[on], token_logprobs(reference, ids, 0.7)[on],
                               atol=1e-5, rtol=1e-5)


def test_prefix_two_images_per_prompt_and_text_only_prompts(vlm):
    image = {"type": "image"}
    two = [[{"role": "user", "content": [image, {"type": "text", "text": "x"}, image, {"type": "text", "text": "y"}]}],
           [{"role": "user", "content": [image, image, {"type": "text", "text": "a longer question"}]}]]
    images = [[gradient_image(64, 48), gradient_image(50, 90, 9)], [gradient_image(90, 60, 40), gradient_image(60, 60)]]
    text_only = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a much longer text prompt"}]]
    ids, mask = completions(vlm, 2 * GROUP)
    on = mask.bool()
    for inputs in (vlm.encode(two, images)[0], vlm.encode(text_only, [[], []])[0]):
        with torch.no_grad():
            shared = token_logprobs(completion_logits(vlm.model, inputs, ids, mask, GROUP), ids)
            reference = token_logprobs(full_forward_logits(vlm, inputs, ids, mask, GROUP), ids)
        torch.testing.assert_close(shared[on], reference[on], atol=1e-5, rtol=1e-5)


def test_rows_of_one_prompt_share_the_first_logits(vlm):
    """Row b*G + g continues prompt b: the logits of the first completion token are the same in a group."""
    inputs = prompts(vlm)
    ids, mask = completions(vlm, 2 * GROUP)
    with torch.no_grad():
        shared = completion_logits(vlm.model, inputs, ids, mask, GROUP)
    first = shared[:, 0].view(2, GROUP, -1)
    torch.testing.assert_close(first, first[:, :1].expand_as(first))
    assert not torch.allclose(first[0, 0], first[1, 0])


def test_feeding_token_by_token_equals_feeding_at_once(vlm):
    inputs = prompts(vlm)
    ids, _ = completions(vlm, 2 * GROUP)
    ones = torch.ones_like(ids)
    with torch.no_grad():
        at_once = SharedPrefix(vlm.model, inputs).repeat(GROUP).feed_hidden(ids, ones)
        prefix = SharedPrefix(vlm.model, inputs).repeat(GROUP)
        stepwise = torch.cat([prefix.feed_hidden(ids[:, t:t + 1], ones[:, t:t + 1]) for t in range(STEPS)], dim=1)
    torch.testing.assert_close(stepwise, at_once, atol=1e-5, rtol=1e-5)
    assert prefix.attention_mask.shape[1] == inputs["input_ids"].shape[1] + STEPS


def test_gradients_equal_full_forward(vlm):
    inputs = prompts(vlm)
    ids, mask = completions(vlm, 2 * GROUP)
    weights = torch.linspace(-1.0, 1.0, 2 * GROUP)[:, None]  # like advantages: differ per row
    params = [p for p in vlm.model.parameters() if p.requires_grad]

    def grads(logits: torch.Tensor) -> list[torch.Tensor]:
        loss = -(token_logprobs(logits, ids) * weights * mask).sum() / mask.sum()
        return torch.autograd.grad(loss, params, allow_unused=True)

    shared = grads(completion_logits(vlm.model, inputs, ids, mask, GROUP))
    reference = grads(full_forward_logits(vlm, inputs, ids, mask, GROUP))
    compared = 0
    vision_nonzero = False
    for param_name, a, b in zip([n for n, p in vlm.model.named_parameters() if p.requires_grad],
                                shared, reference, strict=True):
        assert (a is None) == (b is None), param_name
        if a is None:
            continue
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m, n=param_name: f"{n}: {m}")
        compared += 1
        vision_nonzero |= "visual" in param_name and bool(a.abs().sum() > 0)
    assert compared > 10
    assert vision_nonzero  # the gradient reaches through the cached prompt pass into the vision tower


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_chunked_logprobs_equal_the_full_logits_with_their_gradients(vlm, chunk):
    inputs = prompts(vlm)
    ids, mask = completions(vlm, 2 * GROUP)
    weights = torch.linspace(-1.0, 1.0, 2 * GROUP)[:, None]
    params = [p for p in vlm.model.parameters() if p.requires_grad]
    full = completion_logits(vlm.model, inputs, ids, mask, GROUP)
    full_logp = token_logprobs(full, ids, 0.7)
    full_grads = torch.autograd.grad((full_logp * weights * mask).sum(), params, allow_unused=True)
    hidden = completion_hidden(vlm.model, inputs, Continuation(ids, mask), GROUP)
    logp, entropy = completion_logprobs(vlm.model, hidden, ids, 0.7, chunk_tokens=chunk)
    chunked_grads = torch.autograd.grad((logp * weights * mask).sum(), params, allow_unused=True)
    torch.testing.assert_close(logp, full_logp)
    torch.testing.assert_close(entropy, token_entropy(full, 0.7))
    assert not entropy.requires_grad
    for a, b in zip(chunked_grads, full_grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_the_plain_forward_fallback_gives_the_shared_prefix_states(vlm):
    inputs = prompts(vlm)
    ids, mask = completions(vlm, 2 * GROUP)
    with torch.no_grad():
        shared = completion_hidden(vlm.model, inputs, Continuation(ids, mask), GROUP)
        plain = full_hidden(vlm.model, inputs, Continuation(ids, mask), GROUP, images_per_prompt=[1, 1])
    on = mask.bool()
    torch.testing.assert_close(plain[on], shared[on], atol=1e-5, rtol=1e-4)


def trajectories(vlm):
    """Six multi-turn rows after the two prompts: model turn, an observation with 0, 1 or 2 images
    (tool replies as the family renders them), another model turn; right-padded."""
    generator = torch.Generator().manual_seed(3)
    turn = lambda length: torch.randint(100, 900, (length,), generator=generator).tolist()  # noqa: E731
    observations = [[], [gradient_image(40, 70, 5)], [gradient_image(33, 33, 1), gradient_image(80, 30, 2)]]
    rows, pixels, counts = [], [], []
    for row in range(2 * GROUP):
        images = observations[row % 3]
        text = "\n<|im_start|>user\n" + "<|vision_start|><|image_pad|><|vision_end|>" * len(images) + "look<|im_end|>\n"
        ids, encoded, _ = vlm.encode_observation(text + "<|im_start|>assistant\n", images)
        rows.append(turn(2 + row) + ids + turn(3))
        pixels.append(encoded)
        counts.append(len(images))
    width = max(map(len, rows))
    pad = vlm.tokenizer.pad_token_id
    input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    with_images = [p for p in pixels if p]
    return Continuation(input_ids, mask, torch.cat([p["pixel_values"] for p in with_images]),
                        torch.cat([p["image_grid_thw"] for p in with_images]), counts)


def test_multi_turn_with_images_in_observations_equals_one_full_forward(vlm):
    """Prompt once, then model turns and observations with their pixels fed after it: the same
    log-probs and gradients as one forward over the whole trajectory (positions by the model)."""
    inputs = prompts(vlm)
    continuation = trajectories(vlm)
    mask = continuation.attention_mask
    weights = torch.linspace(-1.0, 1.0, 2 * GROUP)[:, None]
    params = [p for p in vlm.model.parameters() if p.requires_grad]

    def logprobs_and_grads(hidden):
        logp, _ = completion_logprobs(vlm.model, hidden, continuation.input_ids)
        return logp, torch.autograd.grad((logp * weights * mask).sum(), params, allow_unused=True)

    incremental, incremental_grads = logprobs_and_grads(completion_hidden(vlm.model, inputs, continuation, GROUP))
    full, full_grads = logprobs_and_grads(full_hidden(vlm.model, inputs, continuation, GROUP, [1, 1]))
    on = mask.bool()
    torch.testing.assert_close(incremental[on], full[on], atol=1e-5, rtol=1e-5)
    for a, b in zip(incremental_grads, full_grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # the observation images matter: other pixels change the log-probs after them
    other = Continuation(continuation.input_ids, mask, continuation.pixel_values.flip(0), continuation.image_grid_thw,
                         continuation.images_per_row)
    with torch.no_grad():
        changed, _ = completion_logprobs(vlm.model, completion_hidden(vlm.model, inputs, other, GROUP),
                                         continuation.input_ids)
    assert not torch.allclose(changed[1][on[1]], incremental[1][on[1]].detach())


def test_feeding_a_trajectory_in_pieces_equals_feeding_it_at_once(vlm):
    """The sampler's path: model tokens one at a time, the observation with its images in one feed."""
    inputs = prompts(vlm)
    image = gradient_image(40, 70, 5)
    ids, pixels, _ = vlm.encode_observation("\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>x"
                                            "<|im_end|>\n<|im_start|>assistant\n", [image])
    first, last = [511, 512, 513], [514, 515]
    whole = torch.tensor([first + ids + last] * 2)
    with torch.no_grad():
        both = {key: pixels[key].repeat(2, 1) for key in ("pixel_values", "image_grid_thw")}
        at_once = SharedPrefix(vlm.model, inputs).feed_hidden(whole, torch.ones_like(whole), **both)
        prefix = SharedPrefix(vlm.model, inputs)
        pieces = [prefix.feed_hidden(whole[:, t:t + 1], torch.ones(2, 1, dtype=torch.long)) for t in range(3)]
        observation = whole[:, 3:3 + len(ids)]
        pieces.append(prefix.feed_hidden(observation, torch.ones_like(observation), **both))
        pieces += [prefix.feed_hidden(whole[:, t:t + 1], torch.ones(2, 1, dtype=torch.long))
                   for t in range(3 + len(ids), whole.shape[1])]
    torch.testing.assert_close(torch.cat(pieces, dim=1), at_once, atol=1e-5, rtol=1e-5)


def test_token_logprobs_match_log_softmax():
    logits = torch.randn(2, 4, 11, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 11, (2, 4), generator=torch.Generator().manual_seed(1))
    expected = torch.log_softmax(logits / 2.0, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, tokens, temperature=2.0), expected)
    assert token_logprobs(logits.half(), tokens).dtype == torch.float32


def test_token_entropy_uniform_and_peaked():
    vocab = 37
    uniform = torch.zeros(3, 5, vocab)
    torch.testing.assert_close(token_entropy(uniform), torch.full((3, 5), math.log(vocab)))
    peaked = torch.full((1, 1, vocab), -1e4)
    peaked[..., 7] = 0.0
    assert token_entropy(peaked).item() == pytest.approx(0.0, abs=1e-6)
    # a higher temperature flattens the distribution
    logits = torch.randn(1, 1, vocab, generator=torch.Generator().manual_seed(0))
    assert token_entropy(logits, temperature=5.0) > token_entropy(logits, temperature=0.5)


def video_prompts(vlm):
    """Two prompts with videos of different lengths (the second also with an image), left-padded."""
    from vlreason.vision.video import Clip
    from vlreason.vision.video_backends import VideoInfo

    def clip(frames: int, seed: int) -> Clip:
        pixels = torch.Generator().manual_seed(seed)
        array = torch.randint(0, 256, (frames, 56, 56, 3), generator=pixels, dtype=torch.uint8).numpy()
        return Clip(array, list(range(frames)), [i / 4 for i in range(frames)], VideoInfo(frames, 4.0, 56, 56, 0, "t"))

    video = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "q"}]}]
    both = [{"role": "user", "content": [{"type": "image"}, {"type": "video"},
                                         {"type": "text", "text": "what moves in this clip?"}]}]
    inputs, _ = vlm.encode([video, both], [[], [gradient_image(64, 48)]], videos=[[clip(4, 1)], [clip(6, 2)]])
    return inputs


def test_prompts_with_videos_score_alike_through_the_cache_and_one_full_forward(vlm):
    """Video prompts run once then completions fed (sampling and scoring) against the gradient-
    checkpointing path's plain forward that repeats each prompt's videos for its rows."""
    inputs = video_prompts(vlm)
    ids, mask = completions(vlm, 2 * GROUP)
    continuation = Continuation(ids, mask)
    with torch.no_grad():
        cached, _ = completion_logprobs(vlm.model, completion_hidden(vlm.model, inputs, continuation, GROUP), ids)
        full, _ = completion_logprobs(vlm.model, full_hidden(vlm.model, inputs, continuation, GROUP, [0, 1]), ids)
        plain = vlm.model(**{k: v for k, v in inputs.items()}).logits[:, -1]
    on = mask.bool()
    torch.testing.assert_close(cached[on], full[on], atol=1e-5, rtol=1e-5)
    first = token_logprobs(plain[:, None], ids[::GROUP, :1])[:, 0]  # the first completion token of each prompt
    torch.testing.assert_close(cached[::GROUP, 0], first, atol=1e-5, rtol=1e-5)
