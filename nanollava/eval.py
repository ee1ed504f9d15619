"""
Evaluation: LLaVA's question files, the official scorers, and the loop that answers a question file greedily.

A question file is LLaVA's (model_vqa_loader's input): JSON lines {question_id, image?, text[, answer, category]}.
The answers file is LLaVA's answer rows {question_id, prompt, text, answer_id, model_id, metadata} plus the
reference answer and category when the question had them, so that it can be scored again without a model.

The scorers are the official ones, rewritten from the rules of haotian-liu/LLaVA's scripts (the same decisions on
every case of ../shared/fixtures/official/goldens.json, tests/test_eval.py):
- short answers (VQAv2 / TextVQA / GQA style): exact match after m4c_evaluator.py's EvalAIAnswerProcessor;
- yes/no (POPE): eval_pope.py, except that a file with no "yes" prediction gets F1 0.0, not a ZeroDivisionError;
- option letters (ScienceQA): eval_science_qa.py's parser; nanollava's lenient parser gives a second figure, on
  stderr and labelled, which is not comparable with published numbers.
"""
import json
import os
import re
import sys
import time
import uuid
from pathlib import Path

from nanollava.data import read_rows
from nanollava.templates import DataError

LETTERS = ("A", "B", "C", "D", "E")


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- VQA short answers

# EvalAIAnswerProcessor's contractions map the apostrophe-less spelling a model or an annotator writes to the one
# with apostrophes. One apostrophe: the key drops it ("dont" -> "don't"). Two: a key drops either one, not both
# ("couldnt've", "couldn'tve" -> "couldn't've"). The rest is irregular, kept as the official table has it (even
# "somebody'd" -> "somebodyd"). Keys with a capital ("Im", "Id've") never match: the text is lowercased first.
_ONE = ("ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd how'll how's "
        "I'm I've isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've o'clock oughtn't shan't "
        "should've shouldn't somebody'll somebody's someone'd someone'll someone's something'd something'll that's "
        "there'd there're there's they'd they'll they're they've wasn't we've weren't what'll what're what's what've "
        "when's where'd where's where've who'd who'll who's who've why'll why're why's won't would've wouldn't y'all "
        "you'd you'll you're you've").split()
_TWO = ("couldn't've hadn't've he'd've I'd've it'd've mightn't've she'd've shouldn't've somebody'd've someone'd've "
        "something'd've there'd've they'd've we'd've who'd've wouldn't've you'd've").split()
_IRREGULAR = {"let's": "let's", "she's": "she's", "twas": "'twas", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
              "'ow'sat": "'ow's'at", "somebody'd": "somebodyd", "yall'll": "y'all'll", "y'allll": "y'all'll",
              "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've"}


def _contractions():
    table = {w.replace("'", ""): w for w in _ONE}
    for w in _TWO:
        first, second = w.index("'"), w.rindex("'")
        table[w[:first] + w[first + 1:]] = table[w[:second] + w[second + 1:]] = w
    return {**table, **_IRREGULAR}


CONTRACTIONS = _contractions()
NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
NUMBER_WORDS["none"] = "0"  # officially "none" is the count 0
ARTICLES = {"a", "an", "the"}
PUNCTUATION = ';/[]"{}()=+\\_->@`,?!<'  # not . (its own rule), not ' : $ % & # * (kept)
PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("1.5" keeps its point, "U.K." loses both)


def normalize_answer(text):
    """EvalAIAnswerProcessor, step by step: lowercase; commas and ? deleted and "'s" split off ("it's" -> "it 's");
    newlines and tabs to spaces; each punctuation mark deleted where some occurrence of it touches a space in the
    text, else turned into a space ("a_b" -> "a b", "x = 3" -> "x 3"); periods not before a digit deleted (at most
    32 of them, as the official call passes re.UNICODE where the count goes); number words to digits ("none" ->
    "0"), articles dropped, apostrophe-less contractions restored ("dont" -> "don't"); single spaces."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # The official comma rule (delete marks when a comma sits between digits) can no longer fire: commas are gone.
    seen = text
    for p in PUNCTUATION:
        text = text.replace(p, "" if p + " " in seen or " " + p in seen else " ")
    text = PERIOD.sub("", text, count=32)
    words = [NUMBER_WORDS.get(w, w) for w in text.split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


# ----------------------------------------------------------------------------- POPE

def pope_label(text):
    """Official eval_pope.py: keep the first sentence, drop commas; "no" if its words hold No, no or not, else "yes"."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if any(w in ("No", "no", "not") for w in words) else "yes"


def pope_metrics(preds, refs):
    """eval_pope.py's numbers; a reference is positive unless it is "no" (after strip and lowercase). Where the
    official code divides by zero (no "yes" prediction, or no positive reference) the ratio is 0.0."""
    p = [pope_label(t) == "yes" for t in preds]
    y = [r.strip().lower() != "no" for r in refs]
    tp, fp = sum(a and b for a, b in zip(p, y)), sum(a and not b for a, b in zip(p, y))
    tn, fn = sum(not a and not b for a, b in zip(p, y)), sum(not a and b for a, b in zip(p, y))
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": f1, "precision": precision, "recall": recall, "yes-ratio": sum(p) / len(p), "accuracy": (tp + tn) / len(p)}


# ----------------------------------------------------------------------------- option letters

def science_qa_letter(text, n_choices=len(LETTERS)):
    """Official eval_science_qa.py (LLaVA-1.5): the answer exactly an option letter, else "X. " at its very start,
    else "The answer is X" and one more character, found exactly once; the letter must be one of the first
    n_choices. None counts wrong. Nothing is stripped: " B", "B\\n" and "The answer is B" (at the end) fail."""
    if text in LETTERS:
        letter = text
    elif len(text) >= 3 and text[0] in LETTERS and text[1:3] == ". ":
        letter = text[0]
    else:
        found = re.findall(r"The answer is ([A-Z]).", text)
        letter = found[0] if len(found) == 1 else None
    return letter if letter in LETTERS[:n_choices] else None


def parse_letter(text):
    """nanollava's lenient parser (a second figure, not the official one): newlines read as ". ", spaces around a
    lone letter ignored, then "X. ..." at the start, "The answer is X." or "The answer is X" anywhere."""
    text = text.replace("\n", ". ")
    if text.strip() in LETTERS:
        return text.strip()
    m = re.match(r"([A-E])\. ", text) or re.search(r"The answer is ([A-E])\.", text) or re.search(r"The answer is ([A-E])", text)
    return m.group(1) if m else None


# ----------------------------------------------------------------------------- metrics

def metric_kind(refs):
    """POPE if every reference is yes/no, letters if every one is an option letter, else exact match."""
    if all(r.strip().lower() in ("yes", "no") for r in refs):
        return "pope"
    return "letter" if all(r.strip() in LETTERS for r in refs) else "exact"


def metrics(preds, refs, kind=None, parse=science_qa_letter):
    """{name: value} for answers against references, the metric chosen by metric_kind, official scorers (parse:
    the letter parser); accuracy always last."""
    kind = kind or metric_kind(refs)
    if kind == "pope":
        return pope_metrics(preds, refs)
    if kind == "letter":
        hits = [parse(p) == r.strip() for p, r in zip(preds, refs)]
    else:
        hits = [normalize_answer(p) == normalize_answer(r) for p, r in zip(preds, refs)]
    return {"accuracy": sum(hits) / len(hits)}


def score(records, out=None):
    """Prints the official metric lines of answer records (text, answer[, category]) to stdout; per category, and
    for letters the lenient parser's accuracy, to stderr. Returns the official metrics."""
    rows = [r for r in records if r.get("answer") is not None]
    if not rows:
        log(f"{len(records)} answers, none with a reference answer: nothing to score")
        return {}
    refs, preds = [str(r["answer"]) for r in rows], [r["text"] for r in rows]
    kind = metric_kind(refs)
    result = metrics(preds, refs, kind)
    categories = sorted({str(r["category"]) for r in rows if "category" in r})
    for c in categories:
        sub = [(p, a) for p, a, r in zip(preds, refs, rows) if str(r.get("category")) == c]
        m = metrics([p for p, _ in sub], [a for _, a in sub], kind)
        log(f"  {c}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()) + f" (n={len(sub)})")
    log(f"{kind} metrics over {len(rows)} answers with references ({len(records) - len(rows)} without)")
    if kind == "letter":
        lenient = metrics(preds, refs, kind, parse=parse_letter)["accuracy"]
        log(f"lenient letter parser (nanollava's, not comparable with published numbers): accuracy {lenient:.4f}")
    for name, value in result.items():
        print(f"{name}: {value:.4f} (n={len(rows)})", file=out or sys.stdout, flush=True)
    return result


# ----------------------------------------------------------------------------- question and answer files

QUESTION_FIELDS = {"question_id": ((str, int), "a string or a number"), "text": ((str,), "a string"),
                   "image": ((str, type(None)), "a string"), "answer": ((str, int, float, type(None)), "a string"),
                   "category": ((str, int, type(None)), "a string")}


def _type_name(value):
    return "null" if value is None else {str: "a string", int: "a number", float: "a number", bool: "true/false",
                                         list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def read_questions(path, image_root):
    """A LLaVA question file, checked before any work: every row an object with question_id and text, each field
    of its type, every image there. One DataError naming the file and line otherwise."""
    questions = []
    for where, q in read_rows(path):
        if not isinstance(q, dict):
            raise DataError(f"{path}, {where}: a question row must be a JSON object, not {_type_name(q)}")
        for key, (types, rule) in QUESTION_FIELDS.items():
            if key not in q and key in ("question_id", "text"):
                raise DataError(f"{path}, {where}: the question row has no {key!r}")
            if key in q and (not isinstance(q[key], types) or isinstance(q[key], bool)):
                raise DataError(f"{path}, {where}: {key!r} must be {rule}, not {_type_name(q[key])}")
        if q.get("image") and not os.path.isfile(os.path.join(image_root, q["image"])):
            raise DataError(f"{path}, {where}: {os.path.join(image_root, q['image'])}: no such image file")
        questions.append(q)
    return questions


def read_answers(path):
    """An answers file (as evaluate writes it) for score: rows with a string text. One DataError otherwise."""
    rows = []
    for where, r in read_rows(path):
        if not isinstance(r, dict) or not isinstance(r.get("text"), str):
            raise DataError(f"{path}, {where}: an answer row must be an object with a string 'text'")
        rows.append(r)
    return rows


def evaluate(answer_batch, questions, image_root, answers_path, model_id, batch_size=16):
    """Greedy answers to checked question rows, written as LLaVA's answer rows (plus the reference answer and
    category when known). answer_batch([(image path or None, question)]) -> answer texts. The rows go to a
    temporary file beside answers_path, renamed onto it when every question is answered: a failure part-way (a
    bad image, Ctrl-C) leaves an existing answers file as it was. Returns the answer rows."""
    Path(answers_path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{answers_path}.tmp{os.getpid()}"
    records, t0 = [], time.perf_counter()
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for i in range(0, len(questions), batch_size):
                batch = questions[i:i + batch_size]
                texts = answer_batch([(os.path.join(image_root, q["image"]) if q.get("image") else None, q["text"])
                                      for q in batch])
                for q, text in zip(batch, texts):
                    rec = {"question_id": q["question_id"], "prompt": q["text"], "text": text,
                           "answer_id": uuid.uuid4().hex[:22], "model_id": model_id, "metadata": {}}
                    rec.update({k: q[k] for k in ("answer", "category") if k in q})
                    f.write(json.dumps(rec) + "\n")
                    records.append(rec)
                done = i + len(batch)
                log(f"[{done}/{len(questions)}] {done / (time.perf_counter() - t0):.1f} questions/s")
        os.replace(tmp, answers_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    log(f"answers written to {answers_path}")
    return records
