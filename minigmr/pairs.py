"""Scores for a list of (query, document) pairs with mixed queries, in one call, with a progress bar.

What `CrossEncoder.predict(pairs)` (sentence-transformers) and `FlagReranker.compute_score(pairs)` (FlagEmbedding)
offer. Pairs that share a query (same text and same image: path or object) are scored as one group by
`Reranker.score`, so that query's prefix is encoded once and its image goes through the vision tower once; the
scores come back in the order of the pairs.
"""
import os

from tqdm.auto import tqdm

from .prompt import checked_item


def query_key(item) -> tuple:
    """Pairs with equal keys share a query: the text and the image's absolute path (or the PIL object itself)."""
    image = item.image
    return item.text, os.path.abspath(image) if isinstance(image, str) else id(image)


def score_pairs(reranker, pairs, instruction=None, batch_size=None, show_progress_bar=None) -> list:
    """One fp32 score per pair, in order (`reranker.score`'s score: p(yes), or z_yes for score_type "cl").
    show_progress_bar: None shows a bar on a terminal only; the bar counts pairs. A malformed pair, query or
    document is an error naming the pair's index, before any work."""
    if not isinstance(pairs, (list, tuple)):
        raise TypeError(f"pairs must be a list of (query, document) pairs, got {type(pairs).__name__}")
    groups = {}  # query key -> (query, [pair index]), in first-seen order
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"pair {i}: expected a (query, document) pair, got {pair!r:.100}")
        query = checked_item(pair[0], f"pair {i}: query")
        checked_item(pair[1], f"pair {i}: document")
        groups.setdefault(query_key(query), (pair[0], []))[1].append(i)
    scores = [0.0] * len(pairs)
    with tqdm(total=len(pairs), unit="pair", disable=None if show_progress_bar is None else not show_progress_bar,
              desc="reranking") as bar:
        for query, rows in groups.values():
            for i, s in zip(rows, reranker.score(query, [pairs[i][1] for i in rows], instruction, batch_size)):
                scores[i] = s
            bar.update(len(rows))
    return scores
