"""Answer extraction and answer metrics, against hand-worked cases."""

import pytest

from fedtune.eval.tasks.gsm8k import EXEMPLARS, extract_answer, few_shot_prompt, gold_answer, same_number
from fedtune.eval.tasks.nq_open_book import normalize, token_f1


@pytest.mark.parametrize("text, expected", [
    ("She has 3 apples and buys 4 more. The answer is 7.", "7"),
    ("The answer is 1,234.", "1234"),
    ("the answer is -5 degrees", "-5"),
    ("The answer is 3.5.", "3.5"),
    ("The answer is $18. Next she buys 2 more.", "18"),          # the first number after the trigger
    ("5 + 4 = 9. So 9 toys.", "9"),                               # no trigger: the last number
    ("It costs 2,500 dollars, minus 100 is 2,400", "2400"),
    ("He lost -3 then gained 0.25", "0.25"),
    ("The answer is unclear, but maybe 12", "12"),                 # trigger without a number after it: ...
    ("No numbers here.", None),
])
def test_gsm8k_extraction(text, expected):
    assert extract_answer(text) == expected


def test_numbers_compare_as_numbers():
    assert same_number("18.0", "18") and same_number("1234", "1,234") and not same_number(None, "3")
    assert not same_number("17", "18")


def test_gold_answer_from_our_gsm8k_records():
    assert gold_answer("Natalia sold 48/2 = 24 clips.\nThe answer is 72") == "72"
    assert gold_answer("... #### 1,000") == "1000"


def test_eight_standard_exemplars_in_the_prompt():
    p = few_shot_prompt("How many?")
    assert len(EXEMPLARS) == 8 and p.count("Q: ") == 9 and p.count("The answer is") == 8
    assert p.endswith("Q: How many?\nA:") and "The answer is 6.\n\n" in p


def test_token_f1_hand_worked():
    assert normalize("The  Eiffel-Tower!") == "eiffeltower"
    assert token_f1("Wilhelm Conrad Röntgen", "Wilhelm Conrad Röntgen") == 1.0
    # pred 3 tokens, gold 2, 1 shared: P=1/3, R=1/2, F1=0.4
    assert token_f1("in the year 1901", "1901 Stockholm") == pytest.approx(2 * (1 / 3) * 0.5 / (1 / 3 + 0.5))
    assert token_f1("", "x") == 0.0 and token_f1("a", "the") == 1.0  # both empty after normalisation
