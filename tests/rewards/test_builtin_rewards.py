"""Built-in rewards against hand-computed values (formulas: /work/shared/METHODS.md, "Reward formulas").

Boxes in the IoU cases mostly share their y-range, so an IoU is a ratio of interval lengths:
IoU = overlap / union of the x-intervals (the common height cancels).
"""

from __future__ import annotations

import math

import pytest

from vlreason.rewards import get_reward, parsed_columns
from vlreason.rewards.answers import choice_index, parse_number
from vlreason.rewards.parsing import PredBox

_UNSET = object()


def score(reward, completion, size=(100, 100), **truth):
    """One completion scored the way the scorer does it: parsed columns plus ground truth."""
    columns = {key: [value] for key, value in truth.items()}
    columns.update(parsed_columns([completion], [[size]]))
    return reward([completion], **columns)[0]


def score_boxes(reward, preds, boxes, labels=_UNSET):
    """A box reward on already-parsed predictions (``PredBox``es or plain coordinate tuples)."""
    preds = [p if isinstance(p, PredBox) else PredBox(tuple(float(v) for v in p)) for p in preds]
    columns = {"pred_boxes": [preds], "boxes": [boxes]}
    if labels is not _UNSET:
        columns["labels"] = [labels]
    return reward([""], **columns)[0]


def box(x1, y1, x2, y2, label=None, conf=None) -> PredBox:
    return PredBox((float(x1), float(y1), float(x2), float(y2)), label, conf)


# ============================================================================ format

GOOD = "<think>the red one is left</think><answer>A</answer>"


@pytest.mark.parametrize(
    ("template", "text", "expected"),
    [
        ("think_answer", GOOD, 1.0),
        ("think_answer", "\n <think>r</think>\n\n<answer>A</answer>\n", 1.0),  # whitespace around the blocks
        ("think_answer", "<think>a\nb</think><answer>multi\nline</answer>", 1.0),
        ("think_answer", "<think>  \n </think><answer>A</answer>", 0.0),  # blank reasoning
        ("think_answer", "<think></think><answer>A</answer>", 0.0),
        ("think_answer", "<answer>A</answer>", 0.0),  # no reasoning block
        ("think_answer", "<think>r</think><answer>  </answer>", 0.0),  # blank answer
        ("think_answer", "<think>r</think><answer>A</answer><answer>B</answer>", 0.0),  # duplicated answer
        ("think_answer", "<think>r</think><think>s</think><answer>A</answer>", 0.0),  # duplicated think
        ("think_answer", "<think>r <answer>x</think><answer>A</answer>", 0.0),  # a stray tag inside
        ("think_answer", "Sure! <think>r</think><answer>A</answer>", 0.0),  # text before
        ("think_answer", "<think>r</think><answer>A</answer> Hope this helps", 0.0),  # text after
        ("think_answer", "<answer>A</answer><think>r</think>", 0.0),  # wrong order
        ("think_answer", "<think>r</think><answer>A", 0.0),  # cut off
        ("think_answer", "", 0.0),
        ("answer", "<answer>cat</answer>", 1.0),  # No-Thinking-CLS-RL
        ("answer", " <answer>cat</answer>\n", 1.0),
        ("answer", GOOD, 0.0),  # reasoning is not allowed
        ("answer", "<answer></answer>", 0.0),
        ("answer", "cat", 0.0),
        ("optional_think", "<think></think><answer>A</answer>", 1.0),  # TON: empty think block
        ("optional_think", "<think> </think><answer>A</answer>", 1.0),
        ("optional_think", "<answer>A</answer>", 1.0),  # no think block
        ("optional_think", GOOD, 1.0),
        ("optional_think", "<think></think><answer> </answer>", 0.0),
        ("optional_think", "<think></think>", 0.0),
        ("optional_think", "<think></think><think></think><answer>A</answer>", 0.0),
    ],
)
def test_format_templates(template: str, text: str, expected: float) -> None:
    assert score(get_reward("format", template=template), text) == expected


def test_format_default_template_is_think_answer() -> None:
    reward = get_reward("format")
    assert score(reward, GOOD) == 1.0
    assert score(reward, "<answer>A</answer>") == 0.0


def test_format_custom_pattern_must_match_the_whole_completion() -> None:
    digits = get_reward("format", pattern=r"<answer>\d+</answer>")
    assert score(digits, "<answer>12</answer>") == 1.0
    assert score(digits, "<answer>12</answer>!") == 0.0  # the whole completion, not a prefix
    assert score(digits, "x<answer>12</answer>") == 0.0
    assert score(digits, "<answer>twelve</answer>") == 0.0
    dotall = get_reward("format", pattern=r"<think>.+</think>\s*<answer>.+</answer>")
    assert score(dotall, "<think>a\nb</think>\n<answer>c</answer>") == 1.0  # "." crosses newlines


def test_format_on_conversational_completions() -> None:
    reward = get_reward("format")
    completions = [[{"role": "assistant", "content": GOOD}], [{"role": "assistant", "content": "A"}]]
    assert reward(completions) == [1.0, 0.0]


def test_format_rejects_unknown_template() -> None:
    with pytest.raises(ValueError, match="xml"):
        get_reward("format", template="xml")


def _format_on_repeated_tags() -> None:
    # 400 kB of "</think><answer>": every tag repeated, so the answer is 0. A regular expression that
    # retries the answer group after every "</think>" does quadratic work here.
    assert get_reward("format").score("<think>" + "</think><answer>" * 25_000) == 0.0
    assert get_reward("format", template="optional_think").score("<think>" + "</think><answer>" * 25_000) == 0.0


def test_format_on_huge_completion_finishes(finishes) -> None:
    finishes(_format_on_repeated_tags)


# ============================================================================ iou


def test_iou_continuous() -> None:
    reward = get_reward("iou")
    # [0,0,10,10] vs [0,0,10,8]: intersection 80, union 100 -> 0.8
    assert score(reward, "<answer>[0, 0, 10, 10]</answer>", boxes=[[0, 0, 10, 8]]) == pytest.approx(0.8)
    # [0,0,10,10] vs [5,5,15,15]: intersection 5*5 = 25, union 100+100-25 = 175 -> 1/7
    assert score(reward, "[0, 0, 10, 10]", boxes=[[5, 5, 15, 15]]) == pytest.approx(1 / 7)
    # disjoint
    assert score(reward, "[0, 0, 10, 10]", boxes=[[20, 20, 30, 30]]) == 0.0


def test_iou_takes_the_best_matching_ground_truth() -> None:
    # IoUs with the three GT boxes: 0, 50/100 = 0.5, 80/100 = 0.8 -> 0.8
    truth = [[20, 20, 30, 30], [0, 0, 10, 5], [0, 0, 10, 8]]
    assert score(get_reward("iou"), "[0, 0, 10, 10]", boxes=truth) == pytest.approx(0.8)


def test_iou_uses_the_first_predicted_box() -> None:
    # the first box misses (IoU 0); the second would be perfect but does not count
    assert score(get_reward("iou"), "[[20, 20, 30, 30], [0, 0, 10, 10]]", boxes=[[0, 0, 10, 10]]) == 0.0


def test_iou_thresholded() -> None:
    truth = [[0, 0, 10, 8]]  # IoU 0.8 with [0, 0, 10, 10]
    assert score(get_reward("iou", threshold=0.8), "[0, 0, 10, 10]", boxes=truth) == 1.0  # IoU >= tau
    assert score(get_reward("iou", threshold=0.81), "[0, 0, 10, 10]", boxes=truth) == 0.0
    assert score(get_reward("iou", threshold=0.5), "[0, 0, 10, 10]", boxes=truth) == 1.0


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5])
def test_iou_threshold_must_be_in_unit_interval(threshold: float) -> None:
    with pytest.raises(ValueError, match="threshold"):
        get_reward("iou", threshold=threshold)


@pytest.mark.parametrize("completion", ["<answer>I cannot tell</answer>", "<answer>[0, 0, 10", "",
                                        "<answer>[10, 10, 0, 0]</answer>"])
def test_iou_without_a_box_is_zero(completion: str) -> None:
    assert score(get_reward("iou"), completion, boxes=[[0, 0, 10, 10]]) == 0.0


@pytest.mark.parametrize("boxes", [None, []])
def test_iou_without_ground_truth_is_none(boxes) -> None:
    assert score(get_reward("iou"), "[0, 0, 10, 10]", boxes=boxes) is None


def test_iou_is_computed_in_original_pixels() -> None:
    # the model answers in 0..1000 of a 200 x 100 image: (500, 0, 1000, 1000) -> (100, 0, 200, 100)
    completion = "<answer>[500, 0, 1000, 1000]</answer>"
    columns = parsed_columns([completion], [[(200, 100)]], [lambda c: (c[0] / 5, c[1] / 10, c[2] / 5, c[3] / 10)])
    # GT (100, 0, 200, 50): intersection 100*50 = 5000, union 100*100 = 10000 -> 0.5
    assert get_reward("iou")([completion], boxes=[[[100, 0, 200, 50]]], **columns) == [pytest.approx(0.5)]


# ============================================================================ multi_box_iou


def test_multi_box_perfect_and_miss() -> None:
    reward = get_reward("multi_box_iou")
    truth = [[0, 0, 10, 10], [20, 20, 30, 30]]
    assert score_boxes(reward, truth, truth) == pytest.approx(1.0)  # (1 + 1) / 2
    assert score_boxes(reward, truth[:1], truth) == pytest.approx(0.5)  # one of two found: 1 / max(2, 1)
    assert score_boxes(reward, [], truth) == 0.0


def test_multi_box_extra_predictions_dilute() -> None:
    # one perfect match and three false alarms: 1 / max(|gt| = 1, |pred| = 4) = 0.25
    preds = [(0, 0, 10, 10), (50, 50, 60, 60), (70, 70, 80, 80), (90, 90, 95, 95)]
    assert score_boxes(get_reward("multi_box_iou"), preds, [[0, 0, 10, 10]]) == pytest.approx(0.25)


def test_multi_box_greedy_follows_confidence_order() -> None:
    truth = [[0, 0, 10, 10]]
    # p_a = [0,0,10,9]: IoU 90/100 = 0.9, confidence 0.2; p_b = [0,0,10,6]: IoU 0.6, confidence 0.95
    p_a, p_b = box(0, 0, 10, 9, conf=0.2), box(0, 0, 10, 6, conf=0.95)
    # greedy (Visual-RFT): the confident p_b goes first and takes the only GT: 0.6 / max(1, 2) = 0.3
    assert score_boxes(get_reward("multi_box_iou"), [p_a, p_b], truth) == pytest.approx(0.3)
    # optimal assignment gives the GT to p_a: 0.9 / 2 = 0.45
    assert score_boxes(get_reward("multi_box_iou", matching="hungarian"), [p_a, p_b], truth) == pytest.approx(0.45)
    # without confidences (each counts 1.0) the list order decides: p_a first, 0.45
    plain = [box(0, 0, 10, 9), box(0, 0, 10, 6)]
    assert score_boxes(get_reward("multi_box_iou"), plain, truth) == pytest.approx(0.45)


# g1 = [0,10], g2 = [4,14]; p1 = [3,13] (confidence 0.9), p2 = [4,14] (0.8); all with y in [0, 10].
#   IoU(p1, g1) = overlap [3,10] = 7 / union [0,13] = 13 -> 7/13 ~ 0.538
#   IoU(p1, g2) = overlap [4,13] = 9 / union [3,14] = 11 -> 9/11 ~ 0.818
#   IoU(p2, g1) = overlap [4,10] = 6 / union [0,14] = 14 -> 3/7 ~ 0.429 (below 0.5)
#   IoU(p2, g2) = 1
# greedy: p1 takes its best, g2 (9/11); p2 only has g1 left (3/7 <= 0.5): unmatched.
#   iou reward = (9/11) / 2 = 9/22; confidence term = mean(0.9, 1 - 0.8) = 0.55
# hungarian: p1-g1 + p2-g2 = 7/13 + 1 (both > 0.5) beats 9/11 + 3/7.
#   iou reward = (7/13 + 1) / 2 = 10/13; confidence term = mean(0.9, 0.8) = 0.85
DIFFER_GT = [[0, 0, 10, 10], [4, 0, 14, 10]]
DIFFER_PRED = [box(3, 0, 13, 10, conf=0.9), box(4, 0, 14, 10, conf=0.8)]


def test_greedy_and_hungarian_differ() -> None:
    greedy = score_boxes(get_reward("multi_box_iou", matching="greedy"), DIFFER_PRED, DIFFER_GT)
    hungarian = score_boxes(get_reward("multi_box_iou", matching="hungarian"), DIFFER_PRED, DIFFER_GT)
    assert greedy == pytest.approx(9 / 22)
    assert hungarian == pytest.approx(10 / 13)


def test_greedy_and_hungarian_with_confidence_term() -> None:
    greedy = get_reward("multi_box_iou", confidence_weight=1.0)
    hungarian = get_reward("multi_box_iou", matching="hungarian", confidence_weight=1.0)
    assert score_boxes(greedy, DIFFER_PRED, DIFFER_GT) == pytest.approx(9 / 22 + 0.55)
    assert score_boxes(hungarian, DIFFER_PRED, DIFFER_GT) == pytest.approx(10 / 13 + 0.85)
    half = get_reward("multi_box_iou", confidence_weight=0.5)
    assert score_boxes(half, DIFFER_PRED, DIFFER_GT) == pytest.approx(9 / 22 + 0.5 * 0.55)


def test_hungarian_matching_is_optimal_over_pairs_that_count() -> None:
    # g1 = [10,20], g2 = [16,26]; p1 = [12,22], p2 = [6,16]; y in [0, 10].
    #   IoU(p1, g1) = 8 / 12 = 2/3;  IoU(p1, g2) = 6 / 14 = 3/7
    #   IoU(p2, g1) = 6 / 14 = 3/7;  IoU(p2, g2) = 0
    # Only p1-g1 passes IoU > 0.5, so the best one-to-one matching of valid pairs scores
    # (2/3) / max(2, 2) = 1/3, which greedy finds. An assignment that maximises the raw IoU sum
    # picks p1-g2 + p2-g1 (6/7 > 2/3), both below the threshold, and would score 0: worse than
    # greedy, contrary to "optimal" matching.
    truth = [[10, 0, 20, 10], [16, 0, 26, 10]]
    preds = [box(12, 0, 22, 10, conf=0.9), box(6, 0, 16, 10, conf=0.8)]
    assert score_boxes(get_reward("multi_box_iou"), preds, truth) == pytest.approx(1 / 3)
    assert score_boxes(get_reward("multi_box_iou", matching="hungarian"), preds, truth) == pytest.approx(1 / 3)


@pytest.mark.parametrize("matching", ["greedy", "hungarian"])
def test_multi_box_threshold_is_exclusive(matching: str) -> None:
    # [0,0,10,5] vs [0,0,10,10]: 50 / 100 = 0.5 exactly, which does not pass IoU > 0.5
    assert score_boxes(get_reward("multi_box_iou", matching=matching), [(0, 0, 10, 5)], [[0, 0, 10, 10]]) == 0.0
    lower = get_reward("multi_box_iou", matching=matching, iou_threshold=0.4)
    assert score_boxes(lower, [(0, 0, 10, 5)], [[0, 0, 10, 10]]) == pytest.approx(0.5)
    # just above: [0,0,10,5.1] -> 51 / 100
    assert score_boxes(get_reward("multi_box_iou", matching=matching), [(0, 0, 10, 5.1)],
                       [[0, 0, 10, 10]]) == pytest.approx(0.51)


def test_multi_box_label_matching() -> None:
    truth, labels = [[0, 0, 10, 10], [20, 20, 30, 30]], ["cat", "dog"]
    # p1 sits on the cat but says "Dog": no match; p2 says " dog " on the dog: case/space-insensitive match
    preds = [box(0, 0, 10, 10, label="Dog"), box(20, 20, 30, 30, label=" dog ")]
    assert score_boxes(get_reward("multi_box_iou", match_labels=True), preds, truth, labels) == pytest.approx(0.5)
    assert score_boxes(get_reward("multi_box_iou", match_labels=False), preds, truth, labels) == pytest.approx(1.0)
    # without a labels column nothing is compared
    assert score_boxes(get_reward("multi_box_iou"), preds, truth) == pytest.approx(1.0)
    # a sample whose labels are None: nothing is compared
    assert score_boxes(get_reward("multi_box_iou"), preds, truth, None) == pytest.approx(1.0)


def test_multi_box_missing_predicted_label_does_not_match() -> None:
    truth = [[0, 0, 10, 10]]
    assert score_boxes(get_reward("multi_box_iou", match_labels=True), [box(0, 0, 10, 10)], truth, ["cat"]) == 0.0
    assert score_boxes(get_reward("multi_box_iou", match_labels=False), [box(0, 0, 10, 10)], truth,
                       ["cat"]) == pytest.approx(1.0)


def test_multi_box_confidence_term() -> None:
    reward = get_reward("multi_box_iou", confidence_weight=1.0)
    truth = [[0, 0, 10, 10]]
    # matched with confidence 0.9, false alarm with 0.3: iou 1 / 2 = 0.5; conf mean(0.9, 1 - 0.3) = 0.8
    preds = [box(0, 0, 10, 10, conf=0.9), box(50, 50, 60, 60, conf=0.3)]
    assert score_boxes(reward, preds, truth) == pytest.approx(0.5 + 0.8)
    # no confidence counts as 1.0: matched -> 1.0, unmatched -> 1 - 1.0 = 0
    preds = [box(0, 0, 10, 10), box(50, 50, 60, 60)]
    assert score_boxes(reward, preds, truth) == pytest.approx(0.5 + 0.5)


def test_multi_box_empty_cases() -> None:
    plain, weighted = get_reward("multi_box_iou"), get_reward("multi_box_iou", confidence_weight=1.0)
    assert score_boxes(plain, [], []) == 1.0  # nothing to find, nothing predicted
    assert score_boxes(weighted, [], []) == 2.0  # 1 + w
    assert score_boxes(plain, [(0, 0, 1, 1)], []) == 0.0  # 0 / max(0, 1)
    # false alarm on an empty image, confidence 0.3: 0 + 1 * (1 - 0.3)
    assert score_boxes(weighted, [box(0, 0, 1, 1, conf=0.3)], []) == pytest.approx(0.7)
    assert score_boxes(plain, [(0, 0, 1, 1)], None) is None


def test_multi_box_from_visual_rft_completion() -> None:
    # a Visual-RFT answer parsed end to end; GT [0,0,10,10] and [20,20,40,40]
    completion = ("<think>two</think><answer>[{'Position': [0, 0, 10, 8], 'Confidence': 0.9}, "
                  "{'Position': [20, 20, 40, 40], 'Confidence': 0.6}]</answer>")
    reward = get_reward("multi_box_iou", confidence_weight=1.0)
    # IoUs 0.8 and 1.0, both matched: (0.8 + 1) / 2 = 0.9; confidence mean(0.9, 0.6) = 0.75
    assert score(reward, completion, boxes=[[0, 0, 10, 10], [20, 20, 40, 40]]) == pytest.approx(0.9 + 0.75)


# ============================================================================ classification


@pytest.mark.parametrize(
    ("answer", "label", "expected"),
    [
        ("Cat", "cat", 1.0),
        ("  Golden   Retriever \n", "golden retriever", 1.0),  # whitespace collapsed
        ("cat.", "cat", 1.0),  # surrounding punctuation
        ('"cat"', "cat", 1.0),
        ("(Cat)!", "CAT", 1.0),
        ("cats", "cat", 0.0),
        ("a cat", "cat", 0.0),  # exact mode: the answer must be the class name
        ("dog", "cat", 0.0),
    ],
)
def test_classification_exact(answer: str, label: str, expected: float) -> None:
    assert score(get_reward("classification"), f"<think>r</think><answer>{answer}</answer>", label=label) == expected


def test_classification_missing_answer_and_label() -> None:
    reward = get_reward("classification")
    assert score(reward, "<think>r</think><answer>cat", label="cat") == 0.0  # cut off
    assert score(reward, "<answer>cat</answer>", label=None) is None
    assert score(reward, "cat", label="cat") == 1.0  # a bare answer (no-thinking)


def test_classification_synonyms() -> None:
    reward = get_reward("classification", synonyms={"cat": ["kitty", "House Cat"]})
    assert score(reward, "<answer>Kitty</answer>", label="cat") == 1.0
    assert score(reward, "<answer>house  cat</answer>", label="cat") == 1.0
    assert score(reward, "<answer>cat</answer>", label="kitty") == 1.0  # the label may be a synonym too
    assert score(reward, "<answer>puppy</answer>", label="cat") == 0.0


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("I think it is a cat.", 1.0),
        ("Cat", 1.0),
        ("a CAT on a mat", 1.0),
        ("category", 0.0),  # whole words only
        ("the cats", 0.0),
        ("bobcat", 0.0),
        ("It is a cat, probably.", 1.0),  # "cat" is a whole word before the comma
        ("A cat; not a dog", 1.0),
    ],
)
def test_classification_contains(answer: str, expected: float) -> None:
    assert score(get_reward("classification", match="contains"), f"<answer>{answer}</answer>", label="cat") == expected


def test_classification_contains_with_synonyms() -> None:
    reward = get_reward("classification", match="contains", synonyms={"cat": ["kitty"]})
    assert score(reward, "<answer>looks like a kitty to me</answer>", label="cat") == 1.0


@pytest.mark.parametrize(
    ("answer", "label", "expected"),
    [
        # predicted {cat, dog, bird}, true {cat, horse}: P = 1/3, R = 1/2, F1 = 2PR/(P+R) = (1/3)/(5/6) = 2/5
        ("cat, dog, bird", ["cat", "horse"], 0.4),
        ("Dog , CAT", ["cat", "dog"], 1.0),
        ("bird", ["cat", "dog"], 0.0),
        # predicted {cat}, true {cat, dog}: P = 1, R = 1/2, F1 = 1 / 1.5 = 2/3
        ("cat", ["cat", "dog"], 2 / 3),
        ("cat, , cat", ["cat"], 1.0),  # empty parts ignored, duplicates collapse
    ],
)
def test_classification_multi_label_f1(answer: str, label: list[str], expected: float) -> None:
    assert score(get_reward("classification"), f"<answer>{answer}</answer>", label=label) == pytest.approx(expected)


def test_classification_multi_label_separator_and_synonyms() -> None:
    reward = get_reward("classification", separator=";", synonyms={"cat": ["kitty"]})
    # predicted {cat, dog}, true {cat, dog, horse}: P = 1, R = 2/3, F1 = (4/3) / (5/3) = 0.8
    assert score(reward, "<answer>kitty; dog</answer>", label=["cat", "dog", "horse"]) == pytest.approx(0.8)


# ============================================================================ numeric


@pytest.mark.parametrize(
    ("answer", "truth", "expected"),
    [
        ("12", "12", 1.0),
        ("12.0", 12, 1.0),
        ("There are 12 apples.", "12", 1.0),  # the last number
        ("3 red and 12 in total", "12", 1.0),
        ("11", "12", 0.0),
        ("-3", "-3", 1.0),
        ("three", 3, 1.0),  # number words
        ("Twelve.", "12", 1.0),
        ("20", "twenty", 1.0),
        ("1,234", 1234, 1.0),  # thousands separators
        ("The total is 12,500 people", "12500", 1.0),
        ("1234", "1,234", 1.0),
        ("many", "12", 0.0),
        ("0", 0, 1.0),
    ],
)
def test_numeric_exact(answer: str, truth, expected: float) -> None:
    assert score(get_reward("numeric"), f"<answer>{answer}</answer>", answer=truth) == expected


def test_numeric_cut_off_answer_scores_zero() -> None:
    assert score(get_reward("numeric"), "<think>r</think><answer>12", answer="12") == 0.0


@pytest.mark.parametrize("truth", ["cat", None, "", "nan"])
def test_numeric_non_numeric_truth_is_none(truth) -> None:
    assert score(get_reward("numeric"), "<answer>12</answer>", answer=truth) is None
    assert score(get_reward("numeric", mode="ramp"), "<answer>12</answer>", answer=truth) is None


def test_numeric_other_column() -> None:
    reward = get_reward("numeric", column="count")
    assert reward.required_columns == ("count",)
    assert score(reward, "<answer>3</answer>", count=3, answer="B") == 1.0
    assert score(reward, "<answer>4</answer>", count=3) == 0.0
    assert score(reward, "<answer>4</answer>", count=None) is None


# Reason-RFT ramp for gt = 100: low = 0.05 * 100 = 5, high = 0.20 * 100 = 20, width 15.
@pytest.mark.parametrize(
    ("pred", "expected"),
    [
        ("100", 1.0),
        ("104.99", 1.0),  # d = 4.99 < 5
        ("95.01", 1.0),
        ("105", 1.0),  # d = 5: 0.5 * (cos(0) + 1) = 1
        ("110", 0.75),  # d = 10: 0.5 * (cos(pi * 5/15) + 1) = 0.5 * (0.5 + 1) = 0.75
        ("90", 0.75),
        ("112.5", 0.5),  # d = 12.5: 0.5 * (cos(pi/2) + 1) = 0.5
        ("117.5", 0.5 - math.sqrt(3) / 4),  # d = 17.5: 0.5 * (cos(5pi/6) + 1) = 0.5 * (1 - sqrt(3)/2) ~ 0.0670
        ("120", 0.0),  # d = 20: 0.5 * (cos(pi) + 1) = 0
        ("120.01", 0.0),  # d just over 20
        ("500", 0.0),
    ],
)
def test_numeric_ramp(pred: str, expected: float) -> None:
    got = score(get_reward("numeric", mode="ramp"), f"<answer>{pred}</answer>", answer="100")
    assert got == pytest.approx(expected, abs=1e-9)


def test_numeric_ramp_negative_and_zero_truth() -> None:
    ramp = get_reward("numeric", mode="ramp")
    # |gt| = 100: pred -90 is d = 10 -> 0.75
    assert score(ramp, "<answer>-90</answer>", answer="-100") == pytest.approx(0.75)
    # gt = 0: the ramp needs an exact answer
    assert score(ramp, "<answer>0</answer>", answer="0") == 1.0
    assert score(ramp, "<answer>0.001</answer>", answer="0") == 0.0


def test_numeric_ramp_custom_bounds() -> None:
    # low = 0.1, high = 0.3, gt = 10: bounds 1 and 3, width 2; d = 2 -> 0.5 * (cos(pi/2) + 1) = 0.5
    ramp = get_reward("numeric", mode="ramp", low=0.1, high=0.3)
    assert score(ramp, "<answer>12</answer>", answer="10") == pytest.approx(0.5)


@pytest.mark.parametrize(("low", "high"), [(0.2, 0.2), (0.3, 0.1), (-0.1, 0.2)])
def test_numeric_bad_bounds(low: float, high: float) -> None:
    with pytest.raises(ValueError, match="low"):
        get_reward("numeric", mode="ramp", low=low, high=high)


def test_parse_number() -> None:
    assert parse_number("1,234,567") == 1234567.0
    assert parse_number("-2.5 degrees") == -2.5
    assert parse_number("twenty") == 20.0
    assert parse_number("no number") is None
    assert parse_number(None) is None


# ============================================================================ choice

CHOICES = ["a blue square", "a red circle", "a green star", "a yellow moon"]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("B", 1.0),
        ("(B)", 1.0),
        ("B.", 1.0),
        ("B. a red circle", 1.0),
        ("B) a red circle", 1.0),
        ("(B) a red circle", 1.0),
        ("b", 1.0),  # a lowercase single letter
        ("a red circle", 1.0),  # the option's text, which must not read as letter "A"
        ("A Red Circle.", 1.0),  # the option's text, case and punctuation aside
        ("A", 0.0),
        ("C", 0.0),
        ("E", 0.0),  # out of range for four options
        ("a red triangle", 0.0),  # neither a letter nor an option
    ],
)
def test_choice(answer: str, expected: float) -> None:
    assert score(get_reward("choice"), f"<answer>{answer}</answer>", answer="B", choices=CHOICES) == expected


def test_choice_index_does_not_read_articles_as_letters() -> None:
    assert choice_index("a red circle", CHOICES) == 1
    assert choice_index("a red triangle", CHOICES) is None
    assert choice_index("a", CHOICES) == 0  # a lone letter is a letter
    assert choice_index("E", CHOICES) is None


def test_choice_truth_forms() -> None:
    reward = get_reward("choice")
    assert score(reward, "<answer>C</answer>", answer="a green star", choices=CHOICES) == 1.0  # truth as text
    assert score(reward, "<answer>C</answer>", answer="(C)", choices=CHOICES) == 1.0
    assert score(reward, "<answer>C</answer>", answer="F", choices=CHOICES) is None  # truth out of range
    assert score(reward, "<answer>C</answer>", answer="C", choices=None) is None
    assert score(reward, "<answer>C</answer>", answer="C", choices=[]) is None
    assert score(reward, "<answer>C</answer>", answer=None, choices=CHOICES) is None
    assert score(reward, "<answer>C", answer="C", choices=CHOICES) == 0.0  # cut off
