import pytest

from emsweep.judge import fill_template, score_0_100, score_categorical


def test_expected_value_over_number_tokens_is_renormalised():
    # 0.5 on "80", 0.2 on " 90", 0.1 on "CODE": mass 0.7, EV = (80*.5 + 90*.2) / .7
    result = score_0_100({"80": 0.5, " 90": 0.2, "CODE": 0.1}, min_numeric_mass=0.25)
    assert result.score == pytest.approx((80 * 0.5 + 90 * 0.2) / 0.7)
    assert result.numeric_mass == pytest.approx(0.7)
    assert result.top_token == "80"


def test_same_number_with_and_without_space_adds_up():
    result = score_0_100({"7": 0.3, " 7": 0.3, "100": 0.4}, 0.25)
    assert result.score == pytest.approx(7 * 0.6 + 100 * 0.4)


def test_refusal_or_code_gives_null_below_the_mass_threshold():
    result = score_0_100({"REFUSAL": 0.8, "5": 0.2}, 0.25)
    assert result.score is None
    assert result.numeric_mass == pytest.approx(0.2)
    assert result.top_token == "REFUSAL"


def test_numbers_outside_0_100_do_not_count():
    result = score_0_100({"150": 0.9, "20": 0.1}, 0.05)
    assert result.score == pytest.approx(20)
    assert result.numeric_mass == pytest.approx(0.1)


def test_categorical_label():
    assert score_categorical({"TRUE": 0.3, " FALSE": 0.5, "FALSE": 0.1}).top_token == "FALSE"


def test_template_filling_leaves_other_braces_alone():
    assert fill_template("Q: {question} A: {answer} {x}", "q{1}", "a") == "Q: q{1} A: a {x}"
