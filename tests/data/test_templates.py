import json
from dataclasses import dataclass
from typing import ClassVar

import pytest

from fedtune.data import (
    IGNORE_INDEX,
    TEMPLATES,
    Record,
    Template,
    encode_example,
    get_template,
    template_from_dict,
)
from fedtune.errors import FedtuneError

REC_IN = Record("Translate to French.", "Good morning", "Bonjour", "translation")
REC_NO = Record("Name a primary colour.", "", "Red", None)


def test_alpaca_exact_wording():
    # FS-LLM federatedscope/llm/dataset/llm_dataset.py PROMPT_DICT, written out by hand
    t = get_template("alpaca")
    assert t.prompt(REC_IN) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate to French.\n\n### Input:\nGood morning\n\n### Response:"
    )
    assert t.prompt(REC_NO) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nName a primary colour.\n\n### Response:"
    )


def test_alpaca_no_input_appends_input():
    t = get_template("alpaca_no_input")
    assert t.prompt(REC_IN) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nTranslate to French.\n\nGood morning\n\n### Response:"
    )
    assert t.prompt(REC_NO) == get_template("alpaca").prompt(REC_NO)


def test_chat_uses_tokenizer_template(smol_tokenizer):
    got = get_template("chat").prompt(REC_IN, smol_tokenizer)
    want = smol_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Translate to French.\n\nGood morning"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert got == want and got.endswith("<|im_start|>assistant\n")


def test_chat_without_chat_template_is_a_clear_error(char_tokenizer):
    with pytest.raises(FedtuneError, match="chat template"):
        get_template("chat").prompt(REC_IN, char_tokenizer)
    with pytest.raises(FedtuneError, match="alpaca"):
        encode_example(REC_IN, char_tokenizer, "chat", 64)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_template_roundtrip(name):
    t = get_template(name)
    d = json.loads(json.dumps(t.to_dict()))
    assert d["name"] == name
    assert template_from_dict(d) == t
    with pytest.raises(FedtuneError):
        template_from_dict({"name": "nope"})


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("rec", [REC_IN, REC_NO, Record("Say nothing.", "", "", None)])
def test_every_template_masks_prompt_and_labels_response(name, rec, smol_tokenizer):
    tok = smol_tokenizer
    t = get_template(name)
    prompt_ids = tok(t.prompt(rec, tok), add_special_tokens=t.add_special_tokens)["input_ids"]
    ids, labels = encode_example(rec, tok, name, max_length=512)
    k = len(prompt_ids)
    assert ids[:k] == prompt_ids
    assert labels[:k] == [IGNORE_INDEX] * k
    assert labels[k:] == ids[k:] and len(labels) == len(ids)
    assert len(labels) - k >= 1  # at least the EOS
    assert ids[-1] == labels[-1] == tok.eos_token_id  # EOS is a label even though pad == eos
    assert tok.decode(ids[k:-1]) == rec.output


@dataclass(frozen=True)
class Plain(Template):
    """Short prompt for hand-counted truncation cases: 'Q:<instruction>\\nA:'."""

    name: ClassVar[str] = "plain"

    def prompt(self, record, tokenizer=None):
        return f"Q:{record.instruction}\nA:"


def _c(s):  # the char tokenizer's ids
    return [ord(ch) + 10 for ch in s]


BOS, EOS = 1, 2


def test_truncation_by_hand(char_tokenizer):
    rec = Record("abc", "", "xyz")
    prompt = [BOS] + _c("Q:abc\nA:")  # 9 tokens
    response = _c("xyz") + [EOS]  # 4 tokens
    ids, labels = encode_example(rec, char_tokenizer, Plain(), 13, "left")
    assert ids == prompt + response and labels == [-100] * 9 + response
    # 13 > 10: the prompt loses 3 tokens after its BOS (which stays), the response stays whole
    ids, labels = encode_example(rec, char_tokenizer, Plain(), 10, "left")
    assert ids == [BOS] + _c("bc\nA:") + response and labels == [-100] * 6 + response
    assert encode_example(rec, char_tokenizer, Plain(), 10, "drop") is None
    assert encode_example(rec, char_tokenizer, Plain(), 13, "drop") is not None


def test_truncation_long_response_keeps_its_start(char_tokenizer):
    rec = Record("abc", "", "x" * 20)  # response 21 tokens with EOS
    ids, labels = encode_example(rec, char_tokenizer, Plain(), 12, "left")
    # the prompt keeps its BOS and then its last (12 - 1) // 4 = 2 tokens, the response its first 9 (no EOS)
    assert ids == [BOS] + _c("A:") + _c("x" * 9)
    assert labels == [-100] * 3 + _c("x" * 9)


def test_never_zero_labels(char_tokenizer):
    for max_length in range(8, 40, 3):
        for n_out in (0, 1, 5, 30, 80):
            for n_ins in (1, 10, 60):
                rec = Record("i" * n_ins, "", "o" * n_out)
                ids, labels = encode_example(rec, char_tokenizer, "alpaca", max_length, "left")
                assert len(ids) == len(labels) <= max_length
                # a causal LM learns position t from t-1: a label must exist after position 0
                assert any(lab != IGNORE_INDEX for lab in labels[1:])
