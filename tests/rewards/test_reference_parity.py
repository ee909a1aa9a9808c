"""Built-in rewards against the methods' reference reward code, case by case.

Each case is written by hand from what the reference code does with that input (docs/rewards.md
names the references and every deliberate difference): the six items where vlreason scored a
completion differently without saying so, and the documented differences that stay.
"""

from __future__ import annotations

import logging

import pytest

from vlreason.rewards import check_columns, get_reward, parsed_columns
from vlreason.rewards.answers import choice_index, parse_number
from vlreason.rewards.grounding import _note_unlabelled
from vlreason.rewards.parsing import PredBox


def score(reward, completion: str, size=(400, 300), **truth):
    """One completion scored as the scorer does it: parsed columns plus ground truth."""
    columns = {key: [value] for key, value in truth.items()}
    columns.update(parsed_columns([completion], [[size]]))
    return reward([completion], **columns)[0]


# ============================================================ 1. scientific notation (numeric)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1e3", 1000.0),  # read as 3 before
        ("2.5e-3", 0.0025),  # read as -3 before
        ("1.5E+2", 150.0),
        ("-4e2", -400.0),
        (".5e1", 5.0),
        ("about 6.02e23 atoms", 6.02e23),
        ("12,500", 12500.0),  # thousands separators still work
        ("3e", 3.0),  # no exponent digits: just 3
        ("1e999", None),  # overflows to inf: not a number (Reason-RFT's float() gives inf)
    ],
)
def test_scientific_notation_is_one_number(text: str, expected) -> None:
    assert parse_number(text) == expected


def test_numeric_reward_reads_scientific_notation() -> None:
    assert score(get_reward("numeric"), "<answer>1e3</answer>", answer="1000") == 1.0
    assert score(get_reward("numeric"), "<answer>2.5e-3</answer>", answer="0.0025") == 1.0
    # Reason-RFT's ramp on gt = 100: 1.1e2 is d = 10 -> 0.5 * (cos(pi * 5 / 15) + 1) = 0.75
    assert score(get_reward("numeric", mode="ramp"), "<answer>1.1e2</answer>", answer="100") == pytest.approx(0.75)


# ============================================================ 2. duplicate predictions (multi_box_iou)

# The case: GT [100, 201, 305, 211]; the same prediction [101, 202, 325, 212] twice.
# Intersection 204 * 9 = 1836, union 205 * 10 + 224 * 10 - 1836 = 2454: IoU = 1836 / 2454.
DUPLICATED = ("<answer>[{'Position': [101, 202, 325, 212], 'Confidence': 0.5}, "
              "{'Position': [101, 202, 325, 212], 'Confidence': 0.9}]</answer>")
IOU = 1836 / 2454


def test_duplicates_are_dropped_by_default_as_visual_rft_does() -> None:
    truth = [[100, 201, 305, 211]]
    assert score(get_reward("multi_box_iou"), DUPLICATED, boxes=truth) == pytest.approx(IOU)  # 0.748
    # the first copy stays, with its confidence 0.5 (matched): Visual-RFT's confidence reward is 0.5
    assert score(get_reward("multi_box_iou", confidence_weight=1.0), DUPLICATED,
                 boxes=truth) == pytest.approx(IOU + 0.5)


def test_duplicates_kept_are_false_alarms() -> None:
    truth = [[100, 201, 305, 211]]
    keep = get_reward("multi_box_iou", duplicates="keep")
    assert score(keep, DUPLICATED, boxes=truth) == pytest.approx(IOU / 2)  # 0.374: one match, max(1, 2)
    # the 0.9 copy is matched first (confidence order), the 0.5 one is a false alarm: mean(0.9, 0.5)
    keep_conf = get_reward("multi_box_iou", duplicates="keep", confidence_weight=1.0)
    assert score(keep_conf, DUPLICATED, boxes=truth) == pytest.approx(IOU / 2 + 0.7)


def test_only_identical_boxes_are_duplicates() -> None:
    near = "<answer>[[101, 202, 325, 212], [101, 202, 325, 213]]</answer>"  # one pixel apart: two boxes
    assert score(get_reward("multi_box_iou"), near, boxes=[[100, 201, 305, 211]]) == pytest.approx(IOU / 2)
    with_labels = ("<answer>[{'bbox_2d': [101, 202, 325, 212], 'label': 'cat'}, "
                   "{'bbox_2d': [101, 202, 325, 212], 'label': 'dog'}]</answer>")  # coordinates decide
    reward = get_reward("multi_box_iou", match_labels=True)
    assert score(reward, with_labels, boxes=[[100, 201, 305, 211]], labels=["cat"]) == pytest.approx(IOU)


def test_duplicates_option_is_checked() -> None:
    with pytest.raises(ValueError, match="drop, keep"):
        get_reward("multi_box_iou", duplicates="merge")


# ============================================================ 3. label-less predictions

UNLABELLED = "<answer>[{'Position': [0, 0, 100, 100], 'Confidence': 0.9}]</answer>"  # Visual-RFT's output


@pytest.mark.parametrize("name", ["multi_box_iou", "detection_map"])
def test_labelled_data_needs_a_decision_at_start_up(name: str) -> None:
    # before: every label-less prediction silently scored 0 on data with a labels column
    with pytest.raises(ValueError, match=rf"reward '{name}'.*match_labels is unset.*true.*false"):
        check_columns({name: get_reward(name)}, {"id", "boxes", "labels"}, "data/train.jsonl")
    check_columns({name: get_reward(name)}, {"id", "boxes"}, "data/train.jsonl")  # no labels: nothing to decide
    check_columns({name: get_reward(name, match_labels=False)}, {"id", "boxes", "labels"}, "data/train.jsonl")


@pytest.mark.parametrize("name", ["multi_box_iou", "detection_map"])
def test_unset_match_labels_on_a_labelled_sample_raises(name: str) -> None:
    with pytest.raises(ValueError, match="match_labels is unset"):
        score(get_reward(name), UNLABELLED, boxes=[[0, 0, 100, 100]], labels=["cat"])
    assert score(get_reward(name), UNLABELLED, boxes=[[0, 0, 100, 100]]) == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["multi_box_iou", "detection_map"])
def test_match_labels_false_matches_boxes_alone(name: str) -> None:
    reward = get_reward(name, match_labels=False)
    assert score(reward, UNLABELLED, boxes=[[0, 0, 100, 100]], labels=["cat"]) == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["multi_box_iou", "detection_map"])
def test_match_labels_true_says_that_label_less_predictions_match_nothing(name: str, caplog) -> None:
    _note_unlabelled.cache_clear()  # the note is logged once per process
    reward = get_reward(name, match_labels=True)
    with caplog.at_level(logging.WARNING):
        assert score(reward, UNLABELLED, boxes=[[0, 0, 100, 100]], labels=["cat"]) == 0.0
        assert score(reward, UNLABELLED, boxes=[[0, 0, 100, 100]], labels=["cat"]) == 0.0
    notes = [r.getMessage() for r in caplog.records if "without a label" in r.getMessage()]
    assert len(notes) == 1 and name in notes[0] and "match_labels: false" in notes[0]


# ============================================================ 4. class-name normalisation


@pytest.mark.parametrize(("answer", "label"), [("hot_dog", "hot dog"), ("Hot Dog", "hot_dog"),
                                               ("golden_retriever.", "Golden Retriever")])
def test_underscores_read_as_spaces_in_class_names(answer: str, label: str) -> None:
    assert score(get_reward("classification"), f"<answer>{answer}</answer>", label=label) == 1.0  # 0 before


def test_underscores_read_as_spaces_in_box_labels() -> None:
    text = "<answer>[{'bbox_2d': [0, 0, 100, 100], 'label': 'hot_dog', 'confidence': 0.9}]</answer>"
    truth = {"boxes": [[0, 0, 100, 100]], "labels": ["hot dog"]}
    assert score(get_reward("multi_box_iou", match_labels=True), text, **truth) == pytest.approx(1.0)
    assert score(get_reward("detection_map", match_labels=True), text, **truth) == pytest.approx(1.0)


def test_class_names_stay_exact_otherwise() -> None:
    reward = get_reward("classification")
    assert score(reward, "<answer>hotdog</answer>", label="hot dog") == 0.0  # Visual-RFT: 1 (drops spaces)
    assert score(reward, "<answer></answer>", label="hot dog") == 0.0  # Visual-RFT: 1 ("" in every name)
    assert score(reward, "<answer>hot</answer>", label="hot dog") == 0.0  # Visual-RFT: 1 (answer in the name)


# ============================================================ 5. multiple-choice extraction

CHOICES = ["a blue square", "a red circle", "a green star", "a yellow moon"]  # B is right


@pytest.mark.parametrize(
    "answer",
    [
        "The answer is B.",
        "Answer: B",
        "answer: (B)",
        "I think B",
        "Option B",
        "The correct option is **B**",
        "My choice is B because the circle is red.",
        "B, because the circle is red",
        "**B**",
        "So the answer is (B) a red circle.",
        "(A) is a square, so the answer is B",  # a keyword's letter beats a letter in parentheses
        "It must be a red circle.",  # the option's text inside the answer
    ],
)
def test_common_choice_forms_are_read(answer: str) -> None:
    assert choice_index(answer, CHOICES) == 1
    assert score(get_reward("choice"), f"<answer>{answer}</answer>", answer="B", choices=CHOICES) == 1.0


@pytest.mark.parametrize(
    "answer",
    [
        "A big cat",  # a sentence's first "A" before a word is the article
        "I think so",  # "I" is the pronoun (and out of range)
        "It is a red triangle",  # lower-case letters in words are never options
        "B or C",  # two options named: no answer
        "The answer is not clear",
        "Either a red circle or a green star",  # two options' texts
        "E",  # out of range for four options
    ],
)
def test_no_letter_is_read_out_of_ordinary_words(answer: str) -> None:
    assert choice_index(answer, CHOICES) is None


def test_the_last_named_answer_counts() -> None:
    assert choice_index("At first the answer is A, but on reflection the answer is C.", CHOICES) == 2


def test_a_longer_option_text_wins_over_the_one_inside_it() -> None:
    assert choice_index("it is dark red", ["red", "dark red", "blue"]) == 1


# ============================================================ 6. whitespace around the format template


def test_outer_whitespace_is_accepted_by_default() -> None:
    assert get_reward("format").score("\n<think>r</think>\n<answer>A</answer>\n") == 1.0


def test_outer_whitespace_can_be_refused_as_the_references_fullmatch_does() -> None:
    strict = get_reward("format", outer_whitespace=False)
    assert strict.score("<think>r</think>\n<answer>A</answer>") == 1.0  # between the blocks: allowed
    assert strict.score(" <think>r</think><answer>A</answer>") == 0.0
    assert strict.score("<think>r</think><answer>A</answer>\n") == 0.0


# ============================================================ differences that stay (docs/rewards.md)


def test_blank_blocks_fail_the_format_unlike_the_references() -> None:
    # the references' <think>.*?</think>\s*<answer>.*?</answer> accepts empty blocks
    assert get_reward("format").score("<think></think><answer></answer>") == 0.0


def test_one_pixel_overlap_is_not_zero() -> None:
    # VLM-R1's inclusive-pixel IoU scores 0 when boxes overlap by one unit; here: 1 * 10 / (2 * 100 - 10)
    reward = get_reward("iou")
    assert score(reward, "<answer>[0, 0, 10, 10]</answer>", boxes=[[9, 0, 19, 10]]) == pytest.approx(10 / 190)


def test_a_matching_first_number_is_not_a_right_box() -> None:
    # Visual-RFT tries math_verify on the whole completion first: equal first parsed numbers score 1.0
    text = "<answer>[{'Position': [10, 200, 20, 210], 'Confidence': 0.9}]</answer>"
    assert score(get_reward("multi_box_iou"), text, boxes=[[300, 200, 390, 290]]) == 0.0


def test_zero_truth_answered_zero_is_exact() -> None:
    # Reason-RFT's ramp divides by |gt| = 0 and scores the exact answer 0
    assert score(get_reward("numeric", mode="ramp"), "<answer>0</answer>", answer="0") == 1.0


def test_map_ranks_predictions_by_confidence() -> None:
    # VLM-R1's mAP gives every prediction score 1.0; here the confident hit ranks above the false alarm
    ap50 = get_reward("detection_map", metric="ap50")
    hit, miss = PredBox((0.0, 0.0, 10.0, 10.0), None, 0.9), PredBox((50.0, 50.0, 60.0, 60.0), None, 0.1)
    columns = {"pred_boxes": [[miss, hit]], "boxes": [[[0, 0, 10, 10]]]}
    assert ap50([""], **columns)[0] == pytest.approx(1.0)


def _choice_on_huge_answers() -> None:
    # runs of spaces after keywords, sentence ends and letters: quadratic scanning would take minutes
    for text in ("answer" + " " * 200_000 + "x", ("A" + " " * 1000) * 200, ". " * 100_000 + "B",
                 "The answer is " * 20_000, "(A) " * 50_000):
        choice_index(text, CHOICES)


def test_choice_on_huge_answers_finishes(finishes) -> None:
    finishes(_choice_on_huge_answers)
