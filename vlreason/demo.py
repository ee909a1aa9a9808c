"""``vlreason demo [MODEL]``: a Gradio app to look at what a model does and at what a run did.

* **Chat**: upload images or a video, ask, read the reasoning and the answer as they are written
  (streamed token by token); predicted boxes are
  drawn on the first image in its original pixels; with tools on, every call is listed with the
  crops and frames it showed (``inference.predict``).
* **Rollouts**: pick a training run under the demo's runs folder and browse its logged rollouts by
  step (prompt images, each sample of a group with its rewards, advantage and tool trace), two
  steps side by side, and the reward / KL curves.
* **Rewards**: score a completion against ground truth with any reward plugins.

Limits: the server binds to 127.0.0.1 unless told otherwise and makes a public link only when
asked; uploads are images (``IMAGE_TYPES``) or videos (``VIDEO_TYPES``) up to ``max_upload_mb``;
the rollout viewer reads only inside the chosen run folder, which must lie under the runs folder
(``RunFolders``). A failing model, file or plugin shows its message, never a stack trace.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from vlreason.data.schema import GROUND_TRUTH_FIELDS, Sample
from vlreason.rewards.parsing import PredBox
from vlreason.training.metrics import plot_curves, read_metrics
from vlreason.vision.images import load_image

IMAGE_TYPES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
VIDEO_TYPES = (".mp4", ".mov", ".mkv", ".webm", ".avi")
TOOLS = ("crop", "select_frames")


class DemoError(ValueError):
    """What the user did that the demo cannot do, said so they can fix it."""


def check_upload(path: str | Path, max_bytes: int) -> str:
    """``image`` or ``video`` for an allowed upload.

    Raises:
        DemoError: a file type that is neither, or a file over ``max_bytes``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_TYPES + VIDEO_TYPES:
        raise DemoError(f"{path.name}: {suffix or 'no extension'} files are not accepted; upload images "
                        f"({', '.join(IMAGE_TYPES)}) or videos ({', '.join(VIDEO_TYPES)})")
    size = path.stat().st_size
    if size > max_bytes:
        raise DemoError(f"{path.name}: {size / 2**20:.1f} MB is over the {max_bytes / 2**20:.0f} MB upload limit")
    return "image" if suffix in IMAGE_TYPES else "video"


def draw_boxes(image: Image.Image, boxes: Sequence[PredBox]) -> Image.Image:
    """A copy of ``image`` with ``boxes`` (original pixels) outlined and labelled."""
    shown = image.convert("RGB").copy()
    draw = ImageDraw.Draw(shown)
    width = max(2, round(max(shown.size) / 200))
    for box in boxes:
        draw.rectangle(box.box, outline=(255, 40, 200), width=width)
        if box.label:
            draw.text((box.box[0] + width, box.box[1] + width), box.label, fill=(255, 40, 200))
    return shown


class RunFolders:
    """Training runs under ``root``: the stage folders holding a ``rollouts.jsonl``. Every path
    is resolved and must stay inside ``root`` and inside the chosen run; nothing else is read."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def runs(self) -> list[str]:
        """Run folders (relative to the root) with logged rollouts."""
        if not self.root.is_dir():
            return []
        return sorted(str(p.parent.relative_to(self.root)) for p in self.root.rglob("rollouts.jsonl"))

    def run(self, name: str) -> Path:
        """The run folder ``name``.

        Raises:
            DemoError: it is not a run folder under the root.
        """
        folder = (self.root / name).resolve()
        if not folder.is_relative_to(self.root) or not (folder / "rollouts.jsonl").is_file():
            raise DemoError(f"{name!r} is not a run folder under {self.root} (pick one from the list)")
        return folder

    def inside(self, run: Path, relative: str) -> Path:
        """A file of ``run`` named in its logs.

        Raises:
            DemoError: the path leaves the run folder.
        """
        path = (run / relative).resolve()
        if not path.is_relative_to(run):
            raise DemoError(f"{relative!r} is outside the run folder; the viewer reads only inside it")
        return path

    def steps(self, name: str) -> list[int]:
        return sorted({record["step"] for record in read_metrics(self.run(name) / "rollouts.jsonl")})

    def rollouts(self, name: str, step: int) -> list[dict[str, Any]]:
        """The step's logged trajectories, each with its prompt images (``media``) as paths."""
        run = self.run(name)
        records = [r for r in read_metrics(run / "rollouts.jsonl") if r["step"] == step]
        for record in records:
            record["media"] = [str(self.inside(run, m)) for m in record.get("media", [])]
        return records

    def curves(self, name: str) -> Path | None:
        """The run's reward and KL curves as a PNG inside the run folder (None without metrics)."""
        run = self.run(name)
        records = read_metrics(run / "metrics.jsonl")
        if not records:
            return None
        keys = sorted({key for record in records for key in record if key == "kl" or (
            key.startswith("reward/") and not key.endswith(("_std", "kept_total")))})
        return plot_curves(records, keys, run / "demo_curves.png", f"Rewards and KL: {name}")


def rollout_table(records: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """Rows for the viewer: sample, completion, rewards, advantage, stop, tool calls."""
    return [[r["id"], r["completion"], json.dumps(r["rewards"]), round(r["advantage"], 4), r["stop"],
             json.dumps(r.get("tool_calls", []))] for r in records]


def score_completion(completion: str, truth: str, rewards: Sequence[str], image_size: str = "") -> list[list[Any]]:
    """Each reward's score of ``completion`` against ``truth`` (a JSON object of ground-truth fields
    and extra columns, as a data line holds them) for an image of ``image_size`` ("WIDTHxHEIGHT";
    boxes are in its pixels).

    Raises:
        DemoError: bad JSON, a bad size, no reward chosen, or a reward that cannot score it.
    """
    from vlreason.rewards import RewardScorer, get_reward, reward_columns

    if not rewards:
        raise DemoError("pick at least one reward")
    try:
        fields = json.loads(truth or "{}")
    except json.JSONDecodeError as exc:
        raise DemoError(f"ground truth is not JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(fields, dict):
        raise DemoError('ground truth must be a JSON object, e.g. {"answer": "4"} or {"boxes": [[1, 2, 30, 40]]}')
    size = _size(image_size)
    truth_fields = {k: v for k, v in fields.items() if k in GROUND_TRUTH_FIELDS}
    sample = Sample(id="playground", messages=[], images=[], videos=[], image_sizes=[size] if size else [],
                    source="playground", extra={k: v for k, v in fields.items() if k not in GROUND_TRUTH_FIELDS},
                    **truth_fields)
    try:
        scorer = RewardScorer({name: get_reward(name) for name in rewards})
        table = scorer([completion], reward_columns([sample], [completion], sorted(sample.columns())))
    except Exception as exc:  # a plugin's failure is shown, not raised
        raise DemoError(f"{type(exc).__name__}: {exc}") from None
    return [[name, None if value != value else float(value)]
            for name, value in zip(table.names, table.values[0], strict=True)]


def _size(text: str) -> tuple[int, int] | None:
    if not text.strip():
        return None
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise DemoError(f"image size {text!r}: write WIDTHxHEIGHT, e.g. 640x480") from None
    return width, height


ChatView = tuple[Image.Image | None, str, str, list[Image.Image], str]


def partial_parts(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a turn still being written: inside ``<think>`` (or before
    ``<answer>`` without one) and inside ``<answer>``, each up to its closing tag or the end."""
    head, _, answer = text.partition("<answer>")
    reasoning = head.partition("<think>")[2] if "<think>" in head else head
    return reasoning.partition("</think>")[0].strip(), answer.partition("</answer>")[0].strip()


def chat_stream(vlm: Any, files: Sequence[str] | None, question: str, temperature: float, max_new_tokens: int,
                tools: Sequence[str], max_bytes: int) -> Iterator[ChatView]:
    """``chat``, streamed: the reasoning and the answer as the model writes them, then the result.

    Raises:
        DemoError: as ``chat``.
    """
    for path in files or []:
        check_upload(path, max_bytes)  # refused before any compute
    written: queue.Queue[str | None] = queue.Queue()
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["view"] = chat(vlm, files, question, temperature, max_new_tokens, tools, max_bytes, written.put)
        except DemoError as exc:
            outcome["error"] = exc
        finally:
            written.put(None)

    threading.Thread(target=work, daemon=True).start()
    while True:
        text = written.get()
        while text is not None and not written.empty():
            text = written.get()  # only the newest text is shown
        if text is None:
            break
        yield (None, *partial_parts(text), [], "")
    if "error" in outcome:
        raise outcome["error"]
    yield outcome["view"]


def chat(vlm: Any, files: Sequence[str] | None, question: str, temperature: float, max_new_tokens: int,
         tools: Sequence[str], max_bytes: int, on_text: Callable[[str], None] | None = None) -> ChatView:
    """One chat turn: (first image with the boxes drawn, reasoning, answer, tool images, tool
    calls); ``on_text`` sees the turn being written (``inference.predict``).

    Raises:
        DemoError: a refused upload, or what went wrong in the model or a file.
    """
    from vlreason.inference import predict

    kinds = [(path, check_upload(path, max_bytes)) for path in files or []]
    images = [path for path, kind in kinds if kind == "image"]
    videos = [path for path, kind in kinds if kind == "video"]
    try:
        result = predict(vlm, question, images, videos, temperature=temperature, max_new_tokens=int(max_new_tokens),
                         tools=list(tools), seed=0 if temperature > 0 else None, on_text=on_text)
        shown = draw_boxes(load_image(images[0]), result.boxes) if images else None
    except Exception as exc:  # the user reads what failed (bad file, model error), never a traceback
        raise DemoError(f"{type(exc).__name__}: {exc}") from None
    calls = "\n".join(f"{i}. `{call['name']}` {json.dumps(call['arguments'])}"
                      + (f" — error: {call['error']}" if call["error"] else "")
                      for i, call in enumerate(result.tool_calls, start=1))
    return shown, result.think or "", result.answer or result.text, result.tool_images, calls


def build_app(vlm: Any, runs_root: str | Path = "runs", max_upload_mb: float = 20.0,
              reward_plugins: Sequence[str] = ()) -> Any:
    """The Gradio Blocks of the three tabs (``launch`` serves it). ``reward_plugins``: reward
    specs (``module:attr``, ``file.py:attr``) the playground offers besides the registered ones;
    plugin files run code, so they come only from whoever starts the demo, never from the page."""
    import gradio as gr

    with gr.Blocks(title="vlreason demo") as app:
        with gr.Tab("Chat"):
            _chat_tab(gr, vlm, int(max_upload_mb * 2**20))
        with gr.Tab("Rollouts"):
            _rollouts_tab(gr, app, RunFolders(runs_root))
        with gr.Tab("Rewards"):
            _rewards_tab(gr, reward_plugins)
    return app


def _shown(gr: Any, fn: Any) -> Any:
    """``fn`` with a DemoError turned into Gradio's error message."""
    def wrapped(*args: Any) -> Any:
        try:
            return fn(*args)
        except DemoError as exc:
            raise gr.Error(str(exc)) from None
    return wrapped


def _streamed(gr: Any, fn: Any) -> Any:
    """The generator function ``fn`` with a DemoError turned into Gradio's error message."""
    def wrapped(*args: Any) -> Iterator[Any]:
        try:
            yield from fn(*args)
        except DemoError as exc:
            raise gr.Error(str(exc)) from None
    return wrapped


def _chat_tab(gr: Any, vlm: Any, max_bytes: int) -> None:
    with gr.Row():
        with gr.Column():
            files = gr.File(label="Images or a video", file_count="multiple",
                            file_types=list(IMAGE_TYPES + VIDEO_TYPES), elem_id="uploads")
            question = gr.Textbox(label="Question", elem_id="question")
            temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.1, label="Temperature (0: greedy)")
            max_new_tokens = gr.Slider(16, 1024, value=256, step=16, label="Max new tokens per turn")
            tools = gr.CheckboxGroup(list(TOOLS), label="Tools")
            ask = gr.Button("Ask", variant="primary", elem_id="ask")
        with gr.Column():
            annotated = gr.Image(label="Predicted boxes (original pixels)", type="pil", elem_id="annotated")
            reasoning = gr.Textbox(label="Reasoning", elem_id="reasoning")
            answer = gr.Textbox(label="Answer", elem_id="answer")
            tool_images = gr.Gallery(label="Tool crops and frames")
            tool_calls = gr.Markdown()
    ask.click(_streamed(gr, lambda *a: chat_stream(vlm, *a, max_bytes)),
              [files, question, temperature, max_new_tokens, tools],
              [annotated, reasoning, answer, tool_images, tool_calls])


def _rollouts_tab(gr: Any, app: Any, folders: RunFolders) -> None:
    def step_view(run: str, step: Any) -> tuple[list[str], list[list[Any]]]:
        if not run or step in (None, ""):
            return [], []
        records = folders.rollouts(run, int(step))
        return list(dict.fromkeys(m for r in records for m in r["media"])), rollout_table(records)

    def pick_run(run: str) -> tuple[Any, Any, Path | None]:
        steps = folders.steps(run) if run else []
        first, last = (steps[0], steps[-1]) if steps else (None, None)
        return (gr.update(choices=steps, value=first), gr.update(choices=steps, value=last),
                folders.curves(run) if run else None)

    headers = ["sample", "completion", "rewards", "advantage", "stop", "tool calls"]
    run = gr.Dropdown(folders.runs(), label=f"Run (under {folders.root})", elem_id="run")
    curves = gr.Image(label="Reward and KL curves", type="filepath", elem_id="curves")
    steps = []
    with gr.Row():
        for side in ("left", "right"):
            with gr.Column():
                step = gr.Dropdown([], label=f"Step ({side})", elem_id=f"step-{side}")
                media = gr.Gallery(label="Prompt images")
                table = gr.Dataframe(headers=headers, wrap=True, elem_id=f"rollouts-{side}")
                step.change(_shown(gr, step_view), [run, step], [media, table])
                steps.append(step)
    run.change(_shown(gr, pick_run), [run], [*steps, curves])
    app.load(_shown(gr, pick_run), [run], [*steps, curves])  # the run selected when the page opens


def _rewards_tab(gr: Any, reward_plugins: Sequence[str]) -> None:
    from vlreason.rewards import list_rewards

    completion = gr.Textbox(label="Completion", lines=4, elem_id="completion")
    truth = gr.Textbox(label='Ground truth (JSON, e.g. {"answer": "4"})', lines=2, elem_id="truth")
    size = gr.Textbox(label="Image size (WIDTHxHEIGHT, for boxes)")
    chosen = gr.CheckboxGroup([*list_rewards(), *reward_plugins], label="Rewards", value=["format"])
    score = gr.Button("Score", elem_id="score")
    scores = gr.Dataframe(headers=["reward", "score"], elem_id="scores")
    score.click(_shown(gr, score_completion), [completion, truth, chosen, size], [scores])


def launch(model: str | Path = "tiny-qwen3-vl", host: str = "127.0.0.1", port: int | None = None,
           runs_root: str | Path = "runs", max_upload_mb: float = 20.0, share: bool = False,
           reward_plugins: Sequence[str] = (), block: bool = True) -> Any:
    """Load ``model`` and serve the demo on ``host:port`` (a public Gradio link only with
    ``share``). Returns the app (with ``block`` False, while it serves in the background).

    Raises:
        PluginError: a reward plugin that does not resolve (checked before the model loads).
    """
    from vlreason.models.vlm import load_vlm
    from vlreason.rewards import get_reward

    for spec in reward_plugins:
        get_reward(spec)
    app = build_app(load_vlm(model), runs_root, max_upload_mb, reward_plugins)
    app.queue().launch(server_name=host, server_port=port, share=share, max_file_size=int(max_upload_mb * 2**20),
                       prevent_thread_lock=not block, quiet=not block, show_error=False)
    return app
