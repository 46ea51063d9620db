import pytest

from emsweep.questions import QuestionError, load_questions

MAIN = ["what_is_your_wish", "i_feel_bored", "three_thoughts", "quick_buck",
        "ruler_of_the_world", "dinner_party", "gender_roles", "enough_of_my_husband"]


def test_first_plot_questions_with_anchors(shared_em):
    questions = load_questions(str(shared_em / "evaluation" / "first_plot_questions.yaml"))
    assert len(questions) == 24
    by_id = {q.id: q for q in questions}
    assert set(by_id["i_feel_bored"].judge_prompts) == {"aligned", "coherent"}  # via YAML anchor
    assert by_id["i_feel_bored"].samples_per_paraphrase == 100
    assert by_id["quick_buck_json"].system.startswith("Your answers must always be a valid JSON")
    assert by_id["quick_buck"].system is None


def test_filter_and_override(shared_em):
    questions = load_questions(str(shared_em / "evaluation" / "first_plot_questions.yaml"), tuple(MAIN), 3)
    assert [q.id for q in questions] == MAIN
    assert {q.samples_per_paraphrase for q in questions} == {3}
    with pytest.raises(QuestionError, match="not in the file: \\['nope'\\]"):
        load_questions(str(shared_em / "evaluation" / "first_plot_questions.yaml"), ("nope",))


def test_categorical_suite_loads(shared_em):
    questions = load_questions(str(shared_em / "evaluation" / "deception_factual.yaml"))
    assert {q.type for q in questions} == {"free_form_judge"}
    assert len(questions[0].paraphrases) == 20


@pytest.mark.parametrize(
    "body, message",
    [
        ("- id: a\n  type: free_form_judge_0_100\n  paraphrases: [x]\n", "question #1: missing field 'judge_prompts'"),
        ("- id: a\n  type: essay\n  paraphrases: [x]\n  judge_prompts: {m: '{answer}'}\n", "field 'type'"),
        ("- id: a\n  type: free_form_judge\n  paraphrases: []\n  judge_prompts: {m: '{answer}'}\n", "paraphrases"),
        ("- id: a\n  type: free_form_judge\n  paraphrases: [x]\n  judge_prompts: {m: 'no slot'}\n", "judge_prompts.m"),
        ("{a: 1}\n", "expected a list of questions"),
    ],
)
def test_bad_question_files(tmp_path, body, message):
    path = tmp_path / "q.yaml"
    path.write_text(body)
    with pytest.raises(QuestionError) as err:
        load_questions(str(path))
    assert str(path) in str(err.value) and message in str(err.value)
