"""The agent loop: model turns, tool calls and observations, batched across the running rows.

Every running row samples one model turn (``EngineSession.sample``); the agent then decides, row
by row, whether the trajectory goes on (``Agent.continues``) and with what observation
(``Agent.observe``: tool replies with their images, or MGPO's crop), the observation is rendered
the way the family's chat template renders it (``FamilyAdapter.render_continuation``),
tokenised with its images, and appended to the rows that go on (``EngineSession.extend``). Rows
that stop leave the batch. Budgets: model turns (``max_turns``), observation images
(``max_images``) and all tokens after the prompt (``max_tokens``, model turns and observations
together). A trajectory ends cleanly with its reason (``StopReason``): the model answered, a turn
ran out of tokens, the turn budget was spent, or the next observation would overflow the token budget.

The visual memory window (``memory_window``, VR-Thinker): at most that many observation images
are in view. When new ones would overflow it, the images of the oldest calls leave the view —
their tokens stay in the sequence, but the new observation and everything after it no longer
attend to them (``EncodedObservation.hide``, ``Trajectories.hidden``) — and the new observation
says which calls' images went and that calling again shows them.

Agents never raise on model output: malformed calls, unknown tools, bad arguments and tool
exceptions become error observations the model reads, recorded in the trajectory's tool trace
(``Trajectories.tool_calls``) and counted in the logs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from PIL import Image

from vlreason.data.schema import Message
from vlreason.models.adapters import silent_special_ids
from vlreason.models.prefix import HiddenSpan
from vlreason.models.vlm import VLM
from vlreason.rewards.parsing import find_boxes, to_canonical
from vlreason.rollout.engine import (
    EncodedObservation,
    EngineSession,
    ModelTurn,
    PromptBatch,
    RolloutEngine,
    SamplingParams,
    StopReason,
    Trajectories,
)
from vlreason.tools import Tool, ToolContext, ToolError, get_tool, has_tool_call, parse_tool_calls
from vlreason.vision.crops import CropError, crop_region

logger = logging.getLogger(__name__)
IMAGE_PART = {"type": "image"}


@dataclass
class Observation:
    """What the model sees after a turn: messages (tool replies, or a user turn) whose image parts
    take ``images`` in order, and the record of each tool call behind them (message i answers call i)."""

    messages: list[Message]
    images: list[Image.Image] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)


class Agent(Protocol):
    """Decides what follows a model turn."""

    def schemas(self) -> list[dict[str, Any]] | None:
        """The tool schemas the system prompt lists (None: no tools section)."""
        ...

    def continues(self, text: str, turn: int) -> bool:
        """Whether the trajectory goes on after model turn ``turn`` (0-based) that wrote ``text``."""
        ...

    def observe(self, text: str, context: ToolContext, images_left: int) -> Observation:
        """The observation after ``text`` (never raises; at most ``images_left`` images)."""
        ...


class ToolAgent:
    """Runs the tool calls of a turn (Qwen's ``<tool_call>{json}</tool_call>``); a turn without
    one is the answer. Each call gets one tool message: the tool's text and images, or
    ``Error: ...`` saying what was wrong."""

    def __init__(self, tools: Sequence[Tool]):
        self.tools = {tool.name: tool for tool in tools}

    def schemas(self) -> list[dict[str, Any]]:
        return [tool.schema() for tool in self.tools.values()]

    def continues(self, text: str, turn: int) -> bool:
        return has_tool_call(text)

    def observe(self, text: str, context: ToolContext, images_left: int) -> Observation:
        observation = Observation(messages=[])
        for call in parse_tool_calls(text):
            record = {"name": call.name, "arguments": call.arguments, "error": call.error}
            images, reply = [], None
            if call.error is None and call.name not in self.tools:
                record["error"] = f"unknown tool {call.name!r}; the tools are: {', '.join(sorted(self.tools))}"
            if record["error"] is None:
                images, reply, record["error"] = self._run(self.tools[call.name], call.arguments, context, images_left)
            if record["error"] is not None:
                reply = f"Error: {record['error']}"
            images_left -= len(images)
            observation.images += images
            observation.messages.append({"role": "tool", "content": [IMAGE_PART] * len(images) + (
                [{"type": "text", "text": reply}] if reply else [])})
            observation.calls.append(record)
        return observation

    @staticmethod
    def _run(tool: Tool, arguments: dict[str, Any], context: ToolContext, images_left: int
             ) -> tuple[list[Image.Image], str | None, str | None]:
        """``(images, text, error)`` of one call; an error is for the model to read."""
        try:
            result = tool(context, arguments)
        except ToolError as exc:
            return [], None, str(exc)
        except Exception as exc:  # a tool's bug must not end the run: the model reads it, the log counts it
            logger.warning("tool %r raised on arguments %s: %s: %s", tool.name, json.dumps(arguments)[:200],
                           type(exc).__name__, exc)
            return [], None, f"{tool.name} failed: {type(exc).__name__}: {exc}"
        if len(result.images) > images_left:
            return [], None, (f"{tool.name} returned {len(result.images)} image(s) but only {images_left} more fit "
                              "this conversation; ask for fewer, or answer from what you have seen")
        return list(result.images), result.text or None, None


class GroundingAgent:
    """MGPO's two-turn mode: the first turn writes a box (in the family's convention, for the
    first image); the crop of the original image under it is shown in a user turn with
    ``prompt``, and the second turn answers. An unreadable or empty box shows the whole original
    image instead (recorded as an error)."""

    def __init__(self, prompt: str = "Here is the region you selected. Answer the question."):
        self.prompt = prompt

    def schemas(self) -> None:
        return None

    def continues(self, text: str, turn: int) -> bool:
        return turn == 0

    def observe(self, text: str, context: ToolContext, images_left: int) -> Observation:
        image, info = context.images[0], context.infos[0]
        boxes = [to_canonical(raw, lambda values: context.adapter.from_model(values, info), info.original_size)
                 for raw in find_boxes(text)]
        box = next((b.box for b in boxes if b is not None), None)
        record: dict[str, Any] = {"name": "grounding", "arguments": {"box": box}, "error": None}
        shown = image
        if box is None:
            record["error"] = "no valid box in the first turn; the whole image is shown"
        else:
            try:
                shown = crop_region(image, box, context.resize)
            except CropError as exc:
                record["error"] = f"{exc}; the whole image is shown"
        message = {"role": "user", "content": [IMAGE_PART, {"type": "text", "text": self.prompt}]}
        return Observation(messages=[message], images=[shown], calls=[record])


def build_agent(mode: str, tools: Sequence[str] = (), grounding_prompt: str | None = None) -> Agent | None:
    """The agent of ``agent.mode``: None (``none``), a ``ToolAgent`` over the tool specs
    (``tools``: names, ``module:attr`` or ``file.py:attr``) or a ``GroundingAgent``.

    Raises:
        PluginError: a tool spec names no tool.
    """
    if mode == "tools":
        return ToolAgent([get_tool(spec) for spec in tools])
    if mode == "grounding":
        return GroundingAgent(grounding_prompt) if grounding_prompt else GroundingAgent()
    if mode != "none":
        raise ValueError(f"unknown agent mode {mode!r}; use none, tools or grounding")
    return None


@dataclass
class _Row:
    """One trajectory while it is built."""

    ids: list[int] = field(default_factory=list)
    loss: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turns: list[tuple[int, int]] = field(default_factory=list)
    pixels: list[dict[str, torch.Tensor]] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)
    last_turn: list[int] = field(default_factory=list)
    stop: StopReason | None = None
    has_logprobs: bool = True
    in_view: list[tuple[dict[str, Any], list[tuple[int, int]]]] = field(default_factory=list)  # calls, image spans
    hidden: list[HiddenSpan] = field(default_factory=list)

    def add_turn(self, turn: ModelTurn) -> None:
        self.turns.append((len(self.ids), len(self.ids) + len(turn.ids)))
        self.ids += turn.ids
        self.loss += [1] * len(turn.ids)
        self.has_logprobs &= turn.logprobs is not None
        self.logprobs += turn.logprobs or [0.0] * len(turn.ids)
        self.last_turn = turn.ids

    def add_observation(self, ids: list[int], pixels: dict[str, torch.Tensor], images: list[Image.Image]) -> None:
        self.ids += ids
        self.loss += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)
        if pixels:
            self.pixels.append(pixels)
        self.images += images


class AgentLoop:
    """Samples trajectories: one model turn without an agent, turns and observations with one.

    Args:
        vlm: the policy's bundle (its tokenizer, adapter and processor render and encode observations).
        engine: samples the model turns.
        agent: None for single-turn rollouts; a ``ToolAgent`` or ``GroundingAgent``.
        max_turns: model turns per trajectory.
        max_images: images all observations of a trajectory may show.
        max_tokens: tokens after the prompt (model turns and observations); None: no limit
            beyond ``SamplingParams.max_new_tokens`` per turn. Without an agent only that applies.
        memory_window: observation images in view at once (None: all); needs an engine with
            ``hides_tokens``.
    """

    def __init__(self, vlm: VLM, engine: RolloutEngine, agent: Agent | None = None, max_turns: int = 1,
                 max_images: int = 4, max_tokens: int | None = None, memory_window: int | None = None):
        if max_turns < 1 or max_images < 0 or (max_tokens is not None and max_tokens < 1):
            raise ValueError(f"need max_turns >= 1, max_images >= 0 and max_tokens >= 1 (got {max_turns}, "
                             f"{max_images}, {max_tokens})")
        if memory_window is not None and (memory_window < 1 or not getattr(engine, "hides_tokens", False)):
            raise ValueError(f"memory_window {memory_window} needs to be >= 1 and an engine that hides tokens "
                             f"({type(engine).__name__} does not)")
        self.vlm = vlm
        self.engine = engine
        self.agent = agent
        self.max_turns = max_turns if agent is not None else 1
        self.max_images = max_images
        self.max_tokens = max_tokens if agent is not None else None
        self.memory_window = memory_window
        self.silent = set(silent_special_ids(vlm.tokenizer))
        self.pad_id = int(vlm.tokenizer.pad_token_id)
        self.observe_s = 0.0  # the last run's time in agents and observation encoding (not the model)

    @property
    def tool_schemas(self) -> list[dict[str, Any]] | None:
        """What prompts for this loop list in their system prompt."""
        return self.agent.schemas() if self.agent is not None else None

    @property
    def tool_names(self) -> list[str]:
        """Names of the tools the model may call (``grounding`` for MGPO's crop turn)."""
        schemas = self.tool_schemas
        if schemas is not None:
            return [schema["function"]["name"] for schema in schemas]
        return ["grounding"] if isinstance(self.agent, GroundingAgent) else []

    def run(self, prompts: PromptBatch, params: SamplingParams) -> Trajectories:
        """``len(prompts) * params.n`` trajectories (rows grouped by prompt)."""
        self.observe_s = 0.0
        rows = [_Row() for _ in range(len(prompts) * params.n)]
        session = self.engine.start(prompts, params)
        try:
            self._turns(session, rows, prompts, params)
        finally:
            session.close()
        return self._trajectories(rows)

    def _turns(self, session: EngineSession, rows: list[_Row], prompts: PromptBatch, params: SamplingParams) -> None:
        """Model turns and observations until every row has stopped."""
        running = list(range(len(rows)))
        for turn in range(self.max_turns):
            budgets = [self._budget(rows[r], params) for r in running]
            going, observations = [], []
            for index, (r, model_turn) in enumerate(zip(running, session.sample(budgets), strict=True)):
                rows[r].add_turn(model_turn)
                observation = self._after_turn(rows[r], model_turn, turn, prompts, r // params.n)
                if observation is not None:
                    going.append(index)
                    observations.append(observation)
            if not going:
                return
            session.keep(going)
            running = [running[i] for i in going]
            session.extend(observations)

    def _budget(self, row: _Row, params: SamplingParams) -> int:
        if self.max_tokens is None:
            return params.max_new_tokens
        return min(params.max_new_tokens, self.max_tokens - len(row.ids))

    def _after_turn(self, row: _Row, model_turn: ModelTurn, turn: int, prompts: PromptBatch, prompt: int
                    ) -> EncodedObservation | None:
        """The observation to append to ``row``, or None with ``row.stop`` set."""
        text = self.decode(model_turn.ids)
        if not model_turn.ended:
            row.stop = StopReason.TOKENS
        elif self.agent is None or not self.agent.continues(text, turn):
            row.stop = StopReason.END
        elif turn + 1 >= self.max_turns:
            row.stop = StopReason.TURNS
        if row.stop is not None:
            return None
        started = time.perf_counter()
        context = ToolContext(images=prompts.images[prompt], infos=prompts.infos[prompt], adapter=self.vlm.adapter,
                              resize=self.vlm.resize, clips=prompts.clips[prompt])
        images_left = self.max_images - len(row.images)
        if self.memory_window is not None:
            images_left = min(images_left, self.memory_window)
        observation = self.agent.observe(text, context, images_left)
        row.calls += observation.calls
        leaving = self._leaving_view(row, len(observation.images))
        if leaving:
            self._say_out_of_view(observation, [call for call, _ in row.in_view[:leaving]])
        rendered = self.vlm.adapter.render_continuation(observation.messages)
        ids, pixels, resized = self.vlm.encode_observation(rendered, observation.images)
        self.observe_s += time.perf_counter() - started
        if self.max_tokens is not None and len(row.ids) + len(ids) >= self.max_tokens:
            row.stop = StopReason.CONTEXT
            return None
        hide = [span for _, spans in row.in_view[:leaving] for span in spans]
        row.hidden += [HiddenSpan(start, stop, len(row.ids)) for start, stop in hide]
        row.in_view = row.in_view[leaving:] + self._calls_in_view(observation, ids, len(row.ids))
        row.add_observation(ids, pixels, observation.images)
        return EncodedObservation(ids, pixels, resized, hide)

    def _leaving_view(self, row: _Row, incoming: int) -> int:
        """How many of the oldest calls in view must leave it for ``incoming`` new images."""
        if self.memory_window is None or not incoming:
            return 0
        in_view, leaving = sum(len(spans) for _, spans in row.in_view), 0
        while in_view + incoming > self.memory_window:
            in_view -= len(row.in_view[leaving][1])
            leaving += 1
        return leaving

    def _say_out_of_view(self, observation: Observation, calls: list[dict[str, Any]]) -> None:
        """Tell the model, at the end of ``observation``, which calls' images left its view."""
        named = "; ".join(f"{call['name']} {json.dumps(call['arguments'])}" for call in calls)
        note = (f"\n(Out of view now, the visual memory holds {self.memory_window} images: the images of {named}. "
                "Call again to see them.)")
        observation.messages[-1] = {**observation.messages[-1],
                                    "content": [*observation.messages[-1]["content"], {"type": "text", "text": note}]}

    def _calls_in_view(self, observation: Observation, ids: list[int], offset: int
                       ) -> list[tuple[dict[str, Any], list[tuple[int, int]]]]:
        """The observation's calls that showed images, each with its images' token spans
        (counted after the prompt: the observation starts at ``offset``)."""
        spans = iter(self.vlm.adapter.image_spans(ids, self.vlm.tokenizer))
        shown = []
        for call, message in zip(observation.calls, observation.messages, strict=False):
            content = message["content"]
            count = sum(part.get("type") == "image" for part in content) if isinstance(content, list) else 0
            if count:
                shown.append((call, [(start + offset, stop + offset) for start, stop in
                                     (next(spans) for _ in range(count))]))
        return shown

    def decode(self, ids: Sequence[int]) -> str:
        """Text of model-written token ids without the special tokens that mean nothing in text.
        ``skip_special_tokens=True`` would also drop Qwen-VL's box tokens, and with them every box
        the model wrote in its native grounding form."""
        kept = [token for token in ids if token not in self.silent]
        return self.vlm.tokenizer.decode(kept, skip_special_tokens=False)

    def _trajectories(self, rows: list[_Row]) -> Trajectories:
        width = max(len(row.ids) for row in rows)
        pad = lambda values, fill: [v + [fill] * (width - len(v)) for v in values]  # noqa: E731
        pixels = [{key: torch.cat([p[key] for p in row.pixels]) for key in ("pixel_values", "image_grid_thw")}
                  if row.pixels else {} for row in rows]
        with_logprobs = all(row.has_logprobs for row in rows)
        return Trajectories(
            ids=torch.tensor(pad([row.ids for row in rows], self.pad_id), dtype=torch.long),
            attention_mask=torch.tensor(pad([[1] * len(row.ids) for row in rows], 0), dtype=torch.long),
            loss_mask=torch.tensor(pad([row.loss for row in rows], 0), dtype=torch.long),
            texts=[self.decode(row.last_turn) for row in rows],
            stops=[row.stop for row in rows],
            turns=[row.turns for row in rows],
            pixels=pixels,
            logprobs=torch.tensor(pad([row.logprobs for row in rows], 0.0)) if with_logprobs else None,
            tool_calls=[row.calls for row in rows],
            images=[row.images for row in rows],
            hidden=[row.hidden for row in rows])
