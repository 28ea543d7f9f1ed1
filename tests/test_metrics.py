import pytest
import sacrebleu

from workers.metrics import bleu, exact_match, generation_metrics, rouge_l

CAT = "the cat sat on the mat"
CAT_A = "the cat sat on a mat"
DOG = "a dog ran in the park"


def test_identical_strings_score_full_marks():
    scores = generation_metrics([CAT, DOG], [CAT, DOG])
    assert scores == pytest.approx({"exact_match": 1.0, "bleu": 100.0, "rouge_l": 100.0})


def test_exact_match_ignores_surrounding_and_repeated_whitespace():
    assert exact_match(["  the  cat\n sat ", "a dog"], ["the cat sat", "a cat"]) == 0.5
    assert exact_match(["The cat"], ["the cat"]) == 0.0  # case matters


def test_bleu_by_hand():
    # Clipped n-gram precisions of CAT against CAT_A: 5/6, 3/5, 2/4, 1/3; equal lengths, so no brevity penalty.
    assert bleu([CAT], [CAT_A]) == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-9)


def test_rouge_l_by_hand():
    # Longest common subsequence "the cat sat on mat": 5 of 6 tokens each way -> F = 5/6.
    assert rouge_l([CAT], [CAT_A]) == pytest.approx(100 * 5 / 6)
    assert rouge_l([CAT, DOG], [CAT_A, "nothing alike"]) == pytest.approx(100 * 5 / 6 / 2)


def test_multiple_references_of_different_counts():
    preds = [CAT, DOG]
    refs = [["a cat is on a mat", CAT], [DOG]]  # row 0 has two references, row 1 one
    assert generation_metrics(preds, refs) == pytest.approx({"exact_match": 1.0, "bleu": 100.0, "rouge_l": 100.0})
    # The best reference counts, wherever it stands in the row's list.
    refs = [[CAT_A, "no"], ["no", CAT_A, "nothing"]]
    assert rouge_l([CAT, CAT], refs) == pytest.approx(100 * 5 / 6)
    assert bleu([CAT, CAT], refs) == pytest.approx(bleu([CAT, CAT], [CAT_A, CAT_A]))
    # The same as sacrebleu given its reference streams padded with None by hand.
    streams = [[CAT_A, "no"], ["no", CAT_A], [None, "nothing"]]
    assert bleu([CAT, CAT], refs) == sacrebleu.corpus_bleu([CAT, CAT], streams).score


def test_mismatched_lengths_and_empty_input_raise():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        exact_match([CAT, DOG], [CAT])
    with pytest.raises(ValueError, match="no predictions"):
        bleu([], [])
    with pytest.raises(ValueError, match="row 1"):
        rouge_l([CAT, DOG], [[CAT], []])
