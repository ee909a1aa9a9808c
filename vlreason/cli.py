"""The ``vlreason`` command line.

    vlreason train CONFIG.yaml [key=value ...]      run the config's stages (sft, grpo); an output_dir
                   [--resume | --overwrite]         holding a run needs --resume or --overwrite
    vlreason eval MODEL --data FILE.jsonl [--out DIR]   task metrics, JSON + Markdown report + plot
                   [--metric NAME | NAME=SPEC ...]  the metrics to report (default: the data's own)
    vlreason eval --compare A B ... --data FILE     several models, same settings: compare.md/.json/.png
    vlreason quickstart --out DIR                   CPU demo: synthetic grounding, SFT -> GRPO
    vlreason data check FILE.jsonl [FILE ...]       validate every line, image and video
    vlreason data synth TASK --out DIR --n N        write a synthetic task (JSONL + images)
    vlreason data convert FORMAT SRC --out DIR      convert COCO, LLaVA / ShareGPT or MIS-style JSON to JSONL
    vlreason data subset FILE --shots K --out F     k samples per class, drawn with a seed
    vlreason rewards list                           built-in, registered and entry-point rewards
    vlreason rewards check SPEC --data FILE.jsonl   score the data's reference answers
    vlreason tools list                             built-in, registered and entry-point tools
    vlreason demo [MODEL] [--runs DIR]              Gradio app on 127.0.0.1: chat, rollout viewer, rewards
    vlreason rollout-server MODEL [--port P]        serve vLLM generation + weight updates to trainers"""

from __future__ import annotations

import argparse
import errno
import inspect
import logging
import shlex
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import yaml

from vlreason.data import check_jsonl, read_jsonl
from vlreason.data.synth import TASKS, synthesize
from vlreason.registry import PluginError
from vlreason.rollout.vllm_backend import EngineError
from vlreason.training import RankFailed, TrainingStopped
from vlreason.training.distributed import end_launched_process
from vlreason.training.interrupt import TrainingInterrupted

if TYPE_CHECKING:
    from vlreason.eval import EvalReport, Metrics
    from vlreason.rewards import RewardFn
    from vlreason.rollout.agent import Agent
    from vlreason.vision.video import FrameSampling


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; its exit code. A process of a multi-process run ends here instead
    (``end_launched_process``)."""
    code = _run_command(argv)
    end_launched_process(code)
    return code


def _run_command(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except TrainingInterrupted as exc:
        print(f"{exc}\ncontinue with: {_resume_command(args)}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted (nothing saved since the last checkpoint)", file=sys.stderr)
        return 130
    except (PluginError, ValueError, FileNotFoundError, TrainingStopped, RankFailed, EngineError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: the disk is full ({exc}); free some space, then rerun (training: add --resume)",
              file=sys.stderr)
        return 2


def _resume_command(args: argparse.Namespace) -> str:
    """The command that continues an interrupted ``vlreason train``."""
    if getattr(args, "run", None) is not run_train:
        return "the same command"
    words = ["vlreason", "train", args.config, *args.overrides, "--resume"]
    return " ".join(shlex.quote(word) for word in words)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlreason", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(metavar="COMMAND")

    train = commands.add_parser("train", help="run a training config (stages sft -> grpo)")
    train.add_argument("config", metavar="CONFIG.yaml")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="e.g. optim.learning_rate=1e-4 (all stages) or grpo.rollout.num_generations=4")
    resume = train.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true",
                        help="continue the run in output_dir: skip finished stages, continue the next from its "
                             "newest checkpoint (also after raising optim.max_steps)")
    resume.add_argument("--overwrite", action="store_true",
                        help="delete the earlier run's checkpoints, logs and models in output_dir, then start over")
    train.set_defaults(run=run_train)

    _add_eval(commands)

    quick = commands.add_parser("quickstart", help="synthetic grounding on CPU: base -> SFT -> GRPO vs more SFT")
    quick.add_argument("--out", required=True, help="output folder (report.json, reward_curve.png, runs)")
    quick.add_argument("--seed", type=int, default=0)
    quick.add_argument("--device", default="auto",
                       help="auto (the GPU when there is one), cpu, cuda or cuda:N; the README's numbers are the CPU's")
    quick.set_defaults(run=run_quickstart)

    _add_data(commands)

    rewards = commands.add_parser("rewards", help="list rewards or try one on data").add_subparsers(metavar="ACTION")
    listing = rewards.add_parser("list", help="list available rewards")
    listing.set_defaults(run=run_rewards_list)
    score = rewards.add_parser("check", help="score a data file's reference answers with rewards")
    score.add_argument("specs", nargs="+", metavar="SPEC", help="reward name, module:attr or file.py:attr")
    score.add_argument("--data", required=True, metavar="FILE.jsonl")
    score.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                       help="reward option (YAML value); only with a single SPEC")
    score.add_argument("--show", type=int, default=20, help="rows of the per-sample table (default 20)")
    score.add_argument("--on-error", choices=["raise", "skip"], default="raise")
    score.set_defaults(run=run_rewards_check)

    tools = commands.add_parser("tools", help="list the tools a model can call").add_subparsers(metavar="ACTION")
    tools.add_parser("list", help="list available tools").set_defaults(run=run_tools_list)

    _add_demo(commands)
    _add_rollout_server(commands)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _frame_counts(text: str) -> list[int]:
    """``4,8,16`` -> ``[4, 8, 16]``: growing frame counts, each >= 1."""
    counts = [_positive_int(part) for part in text.split(",")]
    if any(b <= a for a, b in zip(counts, counts[1:], strict=False)):
        raise argparse.ArgumentTypeError(f"frame counts must grow, sparse to dense, got {text!r}")
    return counts


def _quiet_transformers() -> None:
    """No per-call bars from transformers (loading weights, writing shards) between our own
    progress bars; hub download bars stay."""
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()  # also turns off the hub's bars ...
    enable_progress_bars()  # ... which a first download needs


def run_train(args: argparse.Namespace) -> int:
    from vlreason.config import load_config
    from vlreason.training.distributed import processes
    from vlreason.training.pipeline import run_pipeline

    _quiet_transformers()
    config = load_config(args.config, args.overrides)
    outcomes = run_pipeline(config, resume=args.resume, overwrite=args.overwrite)
    if not processes().is_main:
        return 0
    rows = [(o.name, o.kind, "-" if o.steps is None else str(o.steps), o.final_path,
             ", ".join(f"{k}={v:.3f}" for k, v in (o.eval or {}).items() if isinstance(v, float)) or "-")
            for o in outcomes]
    print(_format_table(("stage", "kind", "steps", "final model", "eval"), rows))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from functools import partial
    from pathlib import Path

    from vlreason.eval import compare_models, write_report
    from vlreason.rewards import get_reward
    from vlreason.rollout.agent import build_agent
    from vlreason.training.checkpoints import refuse_training_checkpoint
    from vlreason.vision.video import FrameSampling

    for model in _eval_models(args):
        refuse_training_checkpoint(model)
    mode = "tools" if args.tools else "grounding" if args.grounding else "none"
    agent = build_agent(mode, args.tools or ())  # unknown tools fail before the model loads
    safety = (get_reward("safety", **dict(_parse_option(o, "--safety-option") for o in args.safety_option))
              if args.safety_option else None)
    _quiet_transformers()
    sampling = FrameSampling(fps=args.video_fps, min_frames=args.video_min_frames, max_frames=args.video_max_frames)
    if args.memory_window and not args.tools:
        raise ValueError("--memory-window holds the images tools return; add --tools (e.g. --tools select_frames)")
    if args.frame_scaling and (args.votes < 2 or not args.temperature > 0):
        raise ValueError(f"--frame-scaling compares sampled answers: use --votes >= 2 (got {args.votes}) and "
                         f"--temperature > 0 (got {args.temperature})")
    evaluate_model = partial(_evaluate_model, args=args, agent=agent, safety=safety, sampling=sampling,
                             metrics=_eval_metrics(args))
    if args.compare:
        comparison, json_path, md_path = compare_models(args.compare, evaluate_model, args.out or "eval-compare")
        print(_format_table(("metric", *comparison.names),
                            [(name, *(_metric_cell(v) for v in values)) for name, values in comparison.rows()]))
        print(f"\nwrote {json_path} and {md_path}, and each model's report next to them")
        return 0
    report = evaluate_model(args.model)
    out = args.out or (Path(args.model) / "eval" if Path(args.model).is_dir() else Path("eval"))
    json_path, md_path = write_report(report, out, title=f"Evaluation of {args.model}")
    print(_format_table(("metric", "value"), [(k, _metric_cell(v)) for k, v in report.metrics.items()]))
    print(f"\nwrote {json_path} and {md_path}")
    return 0


def _eval_models(args: argparse.Namespace) -> list[str]:
    """The models ``vlreason eval`` evaluates: MODEL, or the two or more of ``--compare``."""
    if args.model and args.compare:
        raise ValueError("give either MODEL (evaluate one model) or --compare A B ... (several side by side), "
                         "not both")
    if not args.model and not args.compare:
        raise ValueError("name the model to evaluate (vlreason eval MODEL --data FILE) or the models to compare "
                         "(vlreason eval --compare A B --data FILE)")
    if args.compare and len(args.compare) < 2:
        raise ValueError("--compare needs two or more models; evaluate one with vlreason eval MODEL")
    if args.compare and args.frame_scaling:
        raise ValueError("--frame-scaling does not combine with --compare; run vlreason eval MODEL --frame-scaling "
                         "... for each model")
    return args.compare or [args.model]


def _eval_metrics(args: argparse.Namespace) -> Metrics | None:
    """The ``--metric`` choices through ``metric_spec`` (None: the data's own metrics), checked
    against the data before any model loads."""
    from vlreason.eval import metric_rewards, metric_spec

    if not args.metric:
        return None
    metrics = metric_spec([_metric_entry(text) for text in args.metric])
    metric_rewards(read_jsonl(args.data).samples[: args.limit], args.data, metrics)
    return metrics


def _metric_entry(text: str) -> str | dict[str, dict[str, str]]:
    """``--metric NAME`` (a built-in metric) or ``--metric NAME=SPEC`` (a reward as a metric) as an
    entry of ``metric_spec``'s list."""
    name, sep, spec = text.partition("=")
    return {name: {"reward": spec}} if sep else text


def _evaluate_model(model: str, args: argparse.Namespace, agent: Agent | None, safety: RewardFn | None,
                    sampling: FrameSampling, metrics: Metrics | None) -> EvalReport:
    """Load ``model`` and evaluate it on ``args.data`` as the eval flags say; the report (the
    model is not kept)."""
    from dataclasses import replace

    from vlreason.eval import evaluate, evaluate_frame_scaling
    from vlreason.models.vlm import load_vlm
    from vlreason.rollout import AgentLoop, HFEngine

    vlm = load_vlm(model, dtype=args.dtype, device=args.device)
    loop = AgentLoop(vlm, HFEngine(vlm), agent, max_turns=args.max_turns, max_tokens=args.max_tokens,
                     memory_window=args.memory_window)
    if args.frame_scaling:
        readers = [vlm.use_video(replace(sampling, min_frames=count, max_frames=count), args.video_max_pixels)
                   for count in args.frame_scaling]
        return evaluate_frame_scaling(vlm, args.data, readers, votes=args.votes, temperature=args.temperature,
                                      batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                      limit=args.limit, loop=loop, metrics=metrics)
    return evaluate(vlm, args.data, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                    limit=args.limit, loop=loop, read_clip=vlm.use_video(sampling, args.video_max_pixels),
                    safety=safety, metrics=metrics)


def _metric_cell(value: object) -> str:
    """A metric as the printed table shows it."""
    if value is None:
        return "-"
    return _cell(value) if isinstance(value, float) else str(value)


def run_quickstart(args: argparse.Namespace) -> int:
    from vlreason.quickstart import QuickstartPlan, format_report, run_quickstart

    _quiet_transformers()
    report = run_quickstart(args.out, seed=args.seed, plan=QuickstartPlan(device=args.device))
    print(format_report(report))
    return 0


def run_data_check(args: argparse.Namespace) -> int:
    from vlreason.data.jsonl import NO_SAMPLES

    failed = False
    for path in args.files:
        valid, problems = check_jsonl(path)
        for problem in problems:
            print(problem)
        lines = len({p.line for p in problems})
        if valid or problems:
            print(f"{path}: {valid} valid sample(s), {len(problems)} problem(s) on {lines} line(s)")
        else:
            print(f"{path}: {NO_SAMPLES}")
        failed = failed or bool(problems) or not valid
    return 1 if failed else 0


def run_data_convert(args: argparse.Namespace) -> int:
    from vlreason.data.convert import convert, format_options

    options = {key: getattr(args, key) for key in ("task", "frequency", "split", "instances")
               if getattr(args, key) is not None}
    if args.column:
        options["columns"] = dict(_pair(text, "--column") for text in args.column)
    wrong = sorted(set(options) - set(format_options(args.format)))
    if wrong:
        raise ValueError(f"--{wrong[0]} does not apply to format {args.format}")
    result = convert(args.format, args.src, args.out, args.image_root, **options)
    for line in result.skipped[:20]:
        print(f"skipped {line}", file=sys.stderr)
    if len(result.skipped) > 20:
        print(f"... and {len(result.skipped) - 20} more skipped records", file=sys.stderr)
    for reason, count in sorted(result.dropped.items()):
        print(f"left out: {count} {reason}")
    print(f"converted {result.converted} sample(s) to {result.path}; skipped {len(result.skipped)} record(s)"
          + (f", listed in {result.skipped_path}" if result.skipped else ""))
    return 0


def run_data_subset(args: argparse.Namespace) -> int:
    from vlreason.data.subset import few_shot

    result = few_shot(args.src, args.out, args.shots, args.seed)
    print(_format_table(("class", "samples"), list(result.per_class.items())))
    for name, count in result.short.items():
        print(f"warning: class {name!r} has only {count} sample(s) in {args.src}; all are kept", file=sys.stderr)
    print(f"wrote {result.kept} samples ({args.shots} shots per class, seed {args.seed}) to {result.path}")
    return 0


def run_data_synth(args: argparse.Namespace) -> int:
    if args.task == "zoom":
        from vlreason.data.zoom import synthesize_zoom
        from vlreason.vision.images import ResizePolicy

        resize = ResizePolicy(factor=32, min_pixels=4 * 32**2, max_pixels=args.max_pixels or 64 * 32**2)
        paths = synthesize_zoom(args.out, n=args.n, seed=args.seed, canvas=args.image_size or 1024, resize=resize)
        print(f"wrote {args.n} zoom samples to {paths[0]} and, as crop-tool traces, to {paths[1]}")
        return 0
    if args.task == "video_qa":
        from vlreason.data.video_qa import QTYPES, synthesize_video_qa

        path = synthesize_video_qa(args.out, n=args.n, seed=args.seed, size=args.image_size or 64,
                                   qtypes=args.qtypes.split(",") if args.qtypes else QTYPES)
        print(f"wrote {args.n} video_qa samples to {path}")
        return 0
    if args.task == "safety":
        from vlreason.data.safety import synthesize_safety

        path = synthesize_safety(args.out, n=args.n, seed=args.seed, size=args.image_size or 64)
        print(f"wrote {args.n} safety samples to {path}")
        return 0
    path = synthesize(args.task, args.out, n=args.n, seed=args.seed, image_size=args.image_size or 112)
    print(f"wrote {args.n} {args.task} samples to {path}")
    return 0


def run_rewards_list(args: argparse.Namespace) -> int:
    from vlreason.rewards import get_reward, list_rewards
    from vlreason.rewards.api import REWARDS, required_columns

    rows = []
    for name in list_rewards():
        try:
            needs = ", ".join(required_columns(get_reward(name))) or "-"
        except (PluginError, TypeError):
            needs = "(needs options)"
        summary = (inspect.getdoc(REWARDS.resolve(name)) or "").split("\n")[0]
        rows.append((name, needs, summary))
    print(_format_table(("reward", "needs columns", "what it scores"), rows))
    print("\nOther rewards are named 'package.module:attr' or 'path/to/file.py:attr' (see rewards/README.md).")
    return 0


def _add_eval(commands: argparse._SubParsersAction) -> None:
    """``vlreason eval MODEL --data FILE``: its model, data, decoding, agent and video arguments."""
    evaluate = commands.add_parser("eval", help="evaluate a model (or compare several) on a data file")
    evaluate.add_argument("model", nargs="?", help="checkpoint directory, hub id or tiny preset")
    evaluate.add_argument("--compare", nargs="+", metavar="MODEL",
                          help="evaluate two or more models (folders, hub ids or tiny presets) one after another "
                               "with the same settings; each one's report in OUT/<n>-<name>/, side by side in "
                               "OUT/compare.md, compare.json and compare.png (instead of MODEL)")
    evaluate.add_argument("--data", required=True, metavar="FILE.jsonl")
    evaluate.add_argument("--out", help="report folder (default: MODEL/eval, or ./eval for a hub id; with "
                                        "--compare: ./eval-compare)")
    evaluate.add_argument("--metric", action="append", default=[], metavar="NAME | NAME=SPEC",
                          help="report this metric instead of the data's own (repeatable): a built-in one ("
                               "format_rate, mean_iou, iou@0.5, box_f1, map, map50, map75, choice_accuracy, accuracy, "
                               "count_accuracy) or a reward as one, e.g. hits=iou or mine=plugins/r.py:MyReward")
    evaluate.add_argument("--batch-size", type=_positive_int, default=32)
    evaluate.add_argument("--max-new-tokens", type=_positive_int, default=64)
    evaluate.add_argument("--limit", type=_positive_int, help="evaluate only the first N samples")
    evaluate.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")
    evaluate.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                          help="compute dtype (auto: the checkpoint's)")
    agent = evaluate.add_mutually_exclusive_group()
    agent.add_argument("--tools", nargs="+", metavar="SPEC",
                       help="tools the model may call in multi-turn rollouts, e.g. crop or tools/rotate.py:rotate")
    agent.add_argument("--grounding", action="store_true",
                       help="MGPO's two turns: a box, then the answer after seeing its crop")
    evaluate.add_argument("--max-turns", type=_positive_int, default=3, help="model turns with --tools (default 3)")
    evaluate.add_argument("--max-tokens", type=_positive_int, default=1024,
                          help="tokens after the prompt with --tools/--grounding (default 1024)")
    evaluate.add_argument("--safety-option", action="append", default=[], metavar="KEY=VALUE",
                          help="an option of the safety reward that sorts safety data (repeatable), e.g. "
                               "judge=refusal_model, 'judge_options={model: ID}', 'categories={fire: [fire, burn]}'")
    evaluate.add_argument("--memory-window", type=_positive_int,
                          help="tool images in view at once with --tools (older ones leave the view; default: all)")
    evaluate.add_argument("--video-fps", type=float, default=2.0,
                          help="video frames taken per second of a clip (as the config's video.fps; default 2)")
    evaluate.add_argument("--video-min-frames", type=_positive_int, default=4, help="video.min_frames (default 4)")
    evaluate.add_argument("--video-max-frames", type=_positive_int, default=16, help="video.max_frames (default 16)")
    evaluate.add_argument("--video-max-pixels", type=_positive_int,
                          help="video.max_pixels: pixels per video frame (default: the model's)")
    evaluate.add_argument("--frame-scaling", type=_frame_counts, metavar="N,N,...",
                          help="Video-RTS: answer each video from N frames first, from more when --votes sampled "
                               "answers disagree (e.g. 4,8,16; replaces the --video-*-frames counts)")
    evaluate.add_argument("--votes", type=_positive_int, default=4,
                          help="answers sampled per round with --frame-scaling (default 4)")
    evaluate.add_argument("--temperature", type=float, default=1.0,
                          help="sampling temperature of the votes with --frame-scaling (default 1.0)")
    evaluate.set_defaults(run=run_eval)


def _add_data(commands: argparse._SubParsersAction) -> None:
    """The ``data`` command's actions: check, convert, subset, synth."""
    data = commands.add_parser("data", help="check or synthesize data files").add_subparsers(metavar="ACTION")
    check = data.add_parser("check", help="validate JSONL files: every line, image and video")
    check.add_argument("files", nargs="+", metavar="FILE.jsonl")
    check.set_defaults(run=run_data_check)
    convert = data.add_parser("convert", help="convert another layout to vlreason's JSONL (see vlreason.data.convert)")
    convert.add_argument("format", choices=["coco", "lvis", "refcoco", "hf", "llava", "mis"],
                         help="coco / lvis: an instances JSON (detection samples, or grounding with --task); refcoco: "
                              "a RefCOCO/+/g refs file and its instances (grounding samples of one --split); hf: a "
                              "Hugging Face dataset (parquet, arrow, json, csv, a saved folder or a hub id); llava: "
                              "LLaVA / ShareGPT conversations or LLaMA-Factory messages with <image> placeholders; "
                              "mis: an MIS-style multi-image safety JSON")
    convert.add_argument("src", help="the source file (hf: also a dataset folder or a hub id)")
    convert.add_argument("--out", required=True, help="output folder (writes <format>[_<task|split|frequency>].jsonl)")
    convert.add_argument("--image-root", help="folder the source's image paths start from (default: the source's)")
    convert.add_argument("--task", choices=["detection", "grounding"],
                         help="coco, lvis: one detection sample per image (default) or one grounding sample per "
                              "object whose category appears once in its image")
    convert.add_argument("--frequency", help="lvis: category groups to keep, comma-separated: rare, common, frequent "
                                             "(default all)")
    convert.add_argument("--split", help="refcoco: train, val, test, testA or testB (required); hf: the split of a "
                                         "folder or hub id (default train)")
    convert.add_argument("--instances", help="refcoco: the instances JSON (default: instances.json beside the refs)")
    convert.add_argument("--column", action="append", default=[], metavar="FIELD=COLUMN",
                         help="hf: which column fills a sample field, e.g. --column prompt=query (repeatable)")
    convert.set_defaults(run=run_data_convert)
    subset = data.add_parser("subset", help="k samples per class, drawn with a seed (few-shot training sets)")
    subset.add_argument("src", metavar="FILE.jsonl")
    subset.add_argument("--shots", type=_positive_int, required=True,
                        help="samples per class (label, labels or category)")
    subset.add_argument("--seed", type=int, default=0)
    subset.add_argument("--out", required=True, help="the subset's JSONL file (media paths are rewritten for it)")
    subset.set_defaults(run=run_data_subset)
    synth = data.add_parser("synth", help="write a synthetic task as JSONL + images")
    synth.add_argument("task", choices=sorted([*TASKS, "zoom", "video_qa", "safety"]),
                       help="zoom writes zoom.jsonl (prompts, direct answers) and zoom_tools.jsonl (crop-tool traces); "
                            "video_qa writes video_qa.jsonl with MP4 clips (needs PyAV); safety writes safety.jsonl "
                            "(two images per sample, half of the pairs hazards)")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--n", type=int, default=1000, help="number of samples (default 1000)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--image-size", type=int,
                       help="square image side in pixels (default 112; zoom: 1024, the canvas; video_qa and "
                            "safety: 64)")
    synth.add_argument("--max-pixels", type=_positive_int,
                       help="zoom: the pixel budget (Qwen3-VL's 32 px merged patches) the tool-trace crops are "
                            "written for: the config's model.max_pixels (default: the tiny models' 65536)")
    synth.add_argument("--qtypes", help="video_qa: question types, comma-separated (default: direction,flashes,first)")
    synth.set_defaults(run=run_data_synth)


def _add_demo(commands: argparse._SubParsersAction) -> None:
    """The ``demo`` command's arguments."""
    demo = commands.add_parser("demo", help="a Gradio app: chat with a model, browse a run's rollouts, try rewards")
    demo.add_argument("model", nargs="?", default="tiny-qwen3-vl",
                      help="hub id, local checkpoint or tiny preset (default: tiny-qwen3-vl)")
    demo.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    demo.add_argument("--port", type=_positive_int, help="port (default: Gradio's first free one from 7860)")
    demo.add_argument("--runs", default="runs", help="folder whose training runs the rollout viewer may open")
    demo.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload accepted (default 20)")
    demo.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")
    demo.add_argument("--reward", action="append", default=[], metavar="SPEC",
                      help="a reward plugin the playground offers (module:attr or path/to/file.py:attr; repeatable; "
                           "plugin files run code, so only the command line can name them)")
    demo.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from vlreason.demo import launch

    _quiet_transformers()
    launch(args.model, host=args.host, port=args.port, runs_root=args.runs, max_upload_mb=args.max_upload_mb,
           share=args.share, reward_plugins=args.reward)
    return 0


def _add_rollout_server(commands: argparse._SubParsersAction) -> None:
    """The ``rollout-server`` command's arguments."""
    server = commands.add_parser("rollout-server", help="serve vLLM rollouts and weight updates to trainers "
                                 "(rollout.engine: vllm, engine_options.url)")
    server.add_argument("model", help="hub id, local checkpoint or tiny preset (the trainer's model)")
    server.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs to split the model over")
    server.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (the checkpoint's)")
    server.add_argument("--max-model-len", type=int, default=4096, help="longest context, in tokens")
    server.add_argument("--max-images", type=int, default=8, help="images one trajectory may hold")
    server.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    server.add_argument("--kv-cache-gib", type=int, default=1, help="KV cache on CPU, in GiB")
    server.add_argument("--min-pixels", type=int, help="the trainer's model.min_pixels, if it sets one")
    server.add_argument("--max-pixels", type=int, help="the trainer's model.max_pixels, if it sets one")
    server.add_argument("--seed", type=int, default=0, help="initialisation seed of a tiny preset")
    server.set_defaults(run=run_rollout_server)


def run_rollout_server(args: argparse.Namespace) -> int:
    from vlreason.models.vlm import load_vlm
    from vlreason.rollout.vllm_backend import identity, start_local
    from vlreason.rollout.vllm_server import RolloutServer

    vlm = load_vlm(args.model, dtype=args.dtype, device="cpu", min_pixels=args.min_pixels,
                   max_pixels=args.max_pixels, seed=args.seed)
    backend = start_local(vlm, max_model_len=args.max_model_len, max_images=args.max_images,
                          gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_gib=args.kv_cache_gib,
                          tensor_parallel_size=args.tensor_parallel_size)
    model = identity(vlm.model.config)
    del vlm  # vLLM holds its own copy of the weights
    server = RolloutServer((args.host, args.port), backend, model)
    print(f"rollout server for {args.model} at {server.url} (stop with Ctrl-C or POST /shutdown)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("rollout server stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


def run_tools_list(args: argparse.Namespace) -> int:
    from vlreason.tools import TOOLS, Tool, list_tools

    rows = []
    for name in list_tools():
        target = TOOLS.resolve(name)
        description = target.description if isinstance(target, Tool) else inspect.getdoc(target)
        rows.append((name, (description or "").split("\n")[0]))
    print(_format_table(("tool", "what it does"), rows))
    print("\nOther tools are named 'package.module:attr' or 'path/to/file.py:attr' (see tools/README.md).")
    return 0


def run_rewards_check(args: argparse.Namespace) -> int:
    from vlreason.rewards import RewardScorer, check_columns, get_reward, reward_columns

    if args.option and len(args.specs) > 1:
        raise ValueError("--option applies to a single SPEC; check rewards with options one at a time")
    options = dict(_parse_option(o, "--option") for o in args.option)
    rewards = {spec: get_reward(spec, **options) for spec in args.specs}
    data = read_jsonl(args.data)
    check_columns(rewards, data.columns, args.data, data.samples)
    samples = [s for s in data.samples if s.response is not None]
    if not samples:
        raise ValueError(f"{args.data}: no sample has a reference response ('response' or a final assistant "
                         "message), and rewards check scores reference responses")
    completions = [s.response for s in samples]
    columns = reward_columns(samples, completions, data.columns)
    table = RewardScorer(rewards, on_error=args.on_error)(completions, columns)
    print(_score_report(table, samples, args.show))
    if len(samples) < len(data.samples):
        print(f"({len(data.samples) - len(samples)} sample(s) without a reference response were left out)")
    return 0


def _pair(text: str, flag: str) -> tuple[str, str]:
    """``KEY=VALUE`` given to ``flag``, split at the first '='."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"{flag} {text!r}: expected KEY=VALUE")
    return key, value


def _parse_option(text: str, flag: str) -> tuple[str, object]:
    """``KEY=VALUE`` given to ``flag``, the value read as YAML (``0.5``, ``true``, ``[1, 2]``)."""
    key, value = _pair(text, flag)
    return key, yaml.safe_load(value)


def _score_report(table, samples, show: int) -> str:
    rows = [(str(i), samples[i].id, *(_cell(v) for v in table.values[i])) for i in range(min(show, len(samples)))]
    header = ("#", "id", *table.names)
    per_sample = _format_table(header, rows)
    values = table.values
    applicable = ~np.isnan(values)
    summary = []
    for label, fn in (("mean", np.nanmean), ("min", np.nanmin), ("max", np.nanmax)):
        cells = [_cell(fn(values[:, j])) if applicable[:, j].any() else "-" for j in range(values.shape[1])]
        summary.append((label, "", *cells))
    summary.append(("n/a", "", *(str(int((~applicable[:, j]).sum())) for j in range(values.shape[1]))))
    summary.append(("failed", "", *(str(table.failures.get(n, 0)) for n in table.names)))
    more = f"... {len(samples) - show} more sample(s)\n" if len(samples) > show else ""
    return f"{per_sample}\n{more}\n{_format_table(('over ' + str(len(samples)), '', *table.names), summary)}"


def _cell(value: float) -> str:
    return "n/a" if np.isnan(value) else f"{value:.3f}"


def _format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
