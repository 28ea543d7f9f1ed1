"""Generation metrics over a corpus: exact match, BLEU and ROUGE-L, each aware of several references.

Scales: `exact_match` is a fraction in [0, 1]; `bleu` and `rouge_l` are in [0, 100], as the
Prefix-Tuning paper's tables report them (BLEU 69.7, ROUGE-L 71.4 on E2E).

references: one reference string per prediction, or a list of reference strings per prediction (any
number >= 1 each, e.g. all E2E references of an input). A prediction scores against its best reference
for exact match and ROUGE-L; BLEU pools n-gram matches over all of a row's references (corpus BLEU).
"""

from __future__ import annotations

from collections.abc import Sequence

import sacrebleu
from rouge_score import rouge_scorer

References = Sequence[str] | Sequence[Sequence[str]]


def exact_match(predictions: Sequence[str], references: References) -> float:
    """Fraction of predictions equal to one of their references, after stripping and collapsing whitespace."""
    refs = _reference_lists(predictions, references)
    hits = sum(_normalize(p) in {_normalize(r) for r in rs} for p, rs in zip(predictions, refs))
    return hits / len(predictions)


def bleu(predictions: Sequence[str], references: References) -> float:
    """sacrebleu's corpus BLEU (default 13a tokenization, exponential smoothing), 0..100.

    sacrebleu wants reference streams: stream k holds every row's k-th reference. Rows with fewer
    references are padded with None, which sacrebleu drops (an empty string would count as a reference).
    """
    refs = _reference_lists(predictions, references)
    width = max(len(rs) for rs in refs)
    streams = [[rs[k] if k < len(rs) else None for rs in refs] for k in range(width)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(predictions: Sequence[str], references: References) -> float:
    """Mean over rows of rouge-score's ROUGE-L F-measure against the row's best reference, 0..100.

    rouge-score lowercases and keeps only ASCII letters and digits as tokens, without stemming.
    """
    refs = _reference_lists(predictions, references)
    total = sum(_ROUGE.score_multi(list(rs), p)["rougeL"].fmeasure for p, rs in zip(predictions, refs))
    return 100.0 * total / len(predictions)


def generation_metrics(predictions: Sequence[str], references: References) -> dict[str, float]:
    """{'exact_match': 0..1, 'bleu': 0..100, 'rouge_l': 0..100} for one corpus of predictions."""
    return {
        "exact_match": exact_match(predictions, references),
        "bleu": bleu(predictions, references),
        "rouge_l": rouge_l(predictions, references),
    }


def _normalize(text: str) -> str:
    return " ".join(text.split())


def _reference_lists(predictions: Sequence[str], references: References) -> list[list[str]]:
    """Each row's references as a non-empty list; ValueError naming the row for a mismatch."""
    if len(predictions) == 0:
        raise ValueError("no predictions to score")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    out = []
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not isinstance(pred, str):
            raise ValueError(f"prediction {i} is a {type(pred).__name__}, not a string")
        if not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references of row {i} must be a string or a non-empty list of strings, got {refs!r}")
        out.append(refs)
    return out
