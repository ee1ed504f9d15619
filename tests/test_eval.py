"""nanollava/eval.py: the official scorers against every decision the official code made on the goldens, the
hand-computed metrics, the question and answer files (types, line numbers), and the all-or-nothing answers file."""
import json

import pytest

import nanollava.eval as ev
from nanollava.data import read_rows
from nanollava.templates import DataError
from conftest import FIXTURES

GOLDENS = FIXTURES / "official" / "goldens.json"


@pytest.fixture(scope="module")
def scorers():
    """The official scorers' decisions (eval_pope.py, eval_science_qa.py, m4c_evaluator.py), or a skip naming why."""
    if not GOLDENS.exists():
        pytest.skip(f"fixture {GOLDENS} is absent (it ships in ../shared/fixtures beside the repo)")
    return json.loads(GOLDENS.read_text())["scorers"]


# ----------------------------------------------------------------------------- the official decisions

def test_vqa_normalisation_and_match_equal_the_official_on_every_golden(scorers):
    assert len(scorers["vqa"]) == 40
    wrong = [(g["prediction"], g["reference"], g["official_normalised"], [ev.normalize_answer(g["prediction"]), ev.normalize_answer(g["reference"])])
             for g in scorers["vqa"]
             if [ev.normalize_answer(g["prediction"]), ev.normalize_answer(g["reference"])] != g["official_normalised"]
             or (ev.normalize_answer(g["prediction"]) == ev.normalize_answer(g["reference"])) != g["official_match"]]
    assert not wrong, wrong
    assert ev.metrics([g["prediction"] for g in scorers["vqa"]], [g["reference"] for g in scorers["vqa"]], "exact") == \
        {"accuracy": pytest.approx(sum(g["official_match"] for g in scorers["vqa"]) / 40)}


def test_pope_labels_equal_the_official_on_every_golden(scorers):
    assert len(scorers["pope"]) == 25
    wrong = [(g["text"], g["official_label"]) for g in scorers["pope"] if ev.pope_label(g["text"]) != g["official_label"]]
    assert not wrong, wrong


def test_science_qa_letters_equal_the_official_on_every_golden(scorers):
    assert len(scorers["sqa"]) == 25
    got = []
    for g in scorers["sqa"]:
        letter = ev.science_qa_letter(g["text"], g["num_choices"])
        index = -1 if letter is None else ev.LETTERS.index(letter)
        got.append((g["text"], index, index == g["answer_index"]))
    assert got == [(g["text"], g["official_parsed_index"], g["official_correct"]) for g in scorers["sqa"]]


def test_official_rules_beyond_the_goldens():
    assert ev.normalize_answer("1,000") == "1000" and ev.normalize_answer("U.S.") == "us"  # the cases of issue 20
    assert ev.normalize_answer("none") == "0" and ev.normalize_answer("hello,world") == "helloworld"
    assert ev.normalize_answer("$ % & #") == "$ % & #" and ev.normalize_answer("snow_board") == "snow board"
    assert ev.normalize_answer("a- b") == "b"  # "- " in the text: every "-" is deleted, not spaced
    assert ev.normalize_answer("x/-y z-w") == "x y z w"  # each mark is judged on the text as given, not as the
    # marks before it left it (the "/" turned to a space puts a space beside "-", yet both "-" become spaces)
    assert ev.normalize_answer("." * 40 + "x") == "." * 8 + "x"  # at most 32 periods go (re.UNICODE passed as count)
    assert ev.science_qa_letter("E", n_choices=4) is None and ev.science_qa_letter("The answer is C.", 2) is None
    assert ev.parse_letter("The answer is B") == "B" and ev.science_qa_letter("The answer is B") is None


def test_pope_all_no_file_scores_f1_zero_not_a_division_by_zero():
    m = ev.pope_metrics(["No.", "No, there is not."], ["yes", "no"])  # the official script divides by TP + FP = 0
    assert m == {"f1": 0.0, "precision": 0.0, "recall": 0.0, "yes-ratio": 0.0, "accuracy": 0.5}


def test_letter_score_prints_the_lenient_figure_labelled_on_stderr(tmp_path, capsys):
    rows = [("A", "A"), (" B", "B"), ("The answer is C", "C"), ("D\nbecause", "D")]  # official 1/4, lenient 4/4
    assert ev.score([{"text": t, "answer": a} for t, a in rows]) == {"accuracy": 0.25}
    out, err = capsys.readouterr()
    assert out == "accuracy: 0.2500 (n=4)\n"
    assert "lenient letter parser (nanollava's, not comparable with published numbers): accuracy 1.0000" in err


# ----------------------------------------------------------------------------- hand-computed (moved from test_sample.py)

def test_metric_functions_against_hand_computed_numbers():
    assert ev.normalize_answer("The Top-Left.") == "top left"
    assert ev.normalize_answer("  Two  apples, an orange!") == "2 apples orange"
    assert ev.normalize_answer("3.5 cm") == "3.5 cm" and ev.normalize_answer("it's") == "it 's"
    # POPE: the first sentence decides; No / no / not as words, commas dropped; anything else is yes
    assert [ev.pope_label(t) for t in ["Yes", "No, there is not.", "There is no dog.", "Yes. But no cat.",
                                           "Nope", "NO", "not", "Yes, it is notable."]] == \
        ["yes", "no", "no", "yes", "yes", "yes", "no", "yes"]
    preds = ["yes", "no", "yes", "no", "yes", "yes"]  # references below: TP 2, FP 2, TN 1, FN 1
    refs = ["yes", "no", "no", "yes", "yes", "no"]
    m = ev.pope_metrics(preds, refs)
    assert m["precision"] == pytest.approx(2 / 4) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3)) and m["accuracy"] == pytest.approx(3 / 6)
    assert m["yes-ratio"] == pytest.approx(4 / 6)
    # ScienceQA: a letter, "X. ...", "The answer is X"; anything else fails
    assert [ev.parse_letter(t) for t in ["B", " C ", "A. a cat", "The answer is D.", "I think The answer is E",
                                             "b", "AB", "Answer: C", ""]] == ["B", "C", "A", "D", "E", None, None, None, None]
    assert ev.metrics(["B", "The answer is A.", "C", "x"], ["B", "A", "D", "A"]) == {"accuracy": 0.5}
    assert ev.metrics(["The red one.", "2", "top left"], ["red", "two", "left"]) == {"accuracy": pytest.approx(1 / 3)}
    assert ev.metric_kind(["Yes", "no"]) == "pope" and ev.metric_kind(["A", "C"]) == "letter"
    assert ev.metric_kind(["yes", "A", "red"]) == "exact"


@pytest.mark.parametrize("kind,rows,expected", [
    ("exact", [("Red.", "red"), ("the circle", "circle"), ("3", "three"), ("blue", "green")], {"accuracy": 0.75}),
    ("pope", [("Yes, there is.", "yes"), ("No.", "no"), ("Yes", "no"), ("There is not one.", "yes")],
     {"f1": 0.5, "precision": 0.5, "recall": 0.5, "yes-ratio": 0.5, "accuracy": 0.5}),
    ("letter", [("A", "A"), ("B. because", "B"), ("The answer is C.", "D"), ("E", "E"), ("no idea", "A")], {"accuracy": 0.6}),
])
def test_score_an_answers_file(tmp_path, capsys, kind, rows, expected):
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps({"question_id": i, "prompt": "q", "text": t, "answer": a}) + "\n"
                            for i, (t, a) in enumerate(rows)) + json.dumps({"question_id": 99, "text": "x"}) + "\n")
    assert ev.score(ev.read_answers(path)) == pytest.approx(expected)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{k}: {v:.4f} (n={len(rows)})" for k, v in expected.items()]
    assert lines[-1].startswith("accuracy: ")


# ----------------------------------------------------------------------------- files

def test_a_bad_json_line_is_named_by_its_line_in_the_file(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question_id": 1, "text": "a"}\n\n{"question_id": 2, "text": "b"}\n{"question_id": 3, \n')
    with pytest.raises(DataError, match=r"q\.jsonl, line 4: not valid JSON"):
        read_rows(path)
    assert [(w, r and r["question_id"]) for w, r in read_rows(path, bad="keep")] == [("line 1", 1), ("line 3", 2), ("line 4", None)]
    path.write_text('[{"question_id": 1,\n "text": "a"},\n {"question_id": 2 "text": "b"}]')
    with pytest.raises(DataError, match=r"q\.jsonl, line 3: not valid JSON"):
        read_rows(path)


@pytest.mark.parametrize("row,message", [
    ({"question_id": 1, "text": 42}, "'text' must be a string, not a number"),
    ({"question_id": 1, "text": None}, "'text' must be a string, not null"),
    ({"question_id": 1, "text": "q", "image": 5}, "'image' must be a string, not a number"),
    ({"question_id": [1], "text": "q"}, "'question_id' must be a string or a number, not a list"),
    ({"text": "q"}, "the question row has no 'question_id'"),
    (["q"], "a question row must be a JSON object, not a list"),
])
def test_question_rows_of_the_wrong_type_are_one_sentence_naming_file_and_line(tmp_path, row, message):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question_id": 0, "text": "fine"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as e:
        ev.read_questions(path, tmp_path)
    assert str(e.value) == f"{path}, line 2: {message}"


def test_answers_file_is_replaced_only_when_every_question_is_answered(tmp_path):
    answers = tmp_path / "answers.jsonl"
    answers.write_text("the previous run\n")
    questions = [{"question_id": i, "text": f"q{i}"} for i in range(3)]

    def fails_on_the_second_batch(items):
        if items[0][1] == "q1":
            raise DataError("q1.png: not an image")
        return ["yes" for _ in items]

    with pytest.raises(DataError):
        ev.evaluate(fails_on_the_second_batch, questions, str(tmp_path), answers, "m", batch_size=1)
    assert answers.read_text() == "the previous run\n" and sorted(p.name for p in tmp_path.iterdir()) == ["answers.jsonl"]
    records = ev.evaluate(lambda items: ["yes" for _ in items], questions, str(tmp_path), answers, "m", batch_size=2)
    assert [r for _, r in read_rows(answers)] == records and [r["question_id"] for r in records] == [0, 1, 2]
