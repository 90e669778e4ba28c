"""Cross-modal retrieval recall, as the official eval_retri.py computes it, in bounded memory.

Definitions (the official ones): the score of a text and an image is the float32 dot product of
their embeddings; a query's rank is the number of candidates whose score is strictly greater than
its correct candidate's (ties count in the query's favour); R@K is the share of queries with
rank < K; a row's meanRecall is the mean of its R@K; the "MeanRecall" row averages Text2Image and
Image2Text column by column.

The official script holds the whole N x N score matrix (10k lines: ~1 GB). Here only one block of
query rows is scored at a time (``text[a:b] @ candidates.T``). Both directions come from the same
block products, so every score is computed once:

* Text2Image ranks of the block's rows are counted directly.
* Image2Text needs each image's positive score before its column can be counted over all rows.
  A cheap pre-pass scores only the positive pairs (small diagonal blocks); the main pass checks
  those against the positives it computes itself, and if BLAS rounded a single one differently
  (it can, for some block shapes) Image2Text is recounted with the exact values. The result is
  therefore always the count over the main pass's scores, like the official's count over its
  score matrix.

Ties: the official counts a tie in the query's favour ("optimistic", the default everywhere), so
collapsed embeddings (identical or all-zero rows) score R@K = 100. The "pessimistic" ranks count a
tied wrong candidate against the query: the rank is the number of wrong candidates scoring >= the
correct one (for Image2Text with several captions: >= its best caption; a tie between two of its
own captions does not count); collapsed embeddings then score the worst case, 0 once there are
more than K candidates. Without ties both are equal; a gap means the scores cannot tell the
candidates apart. The ``*_both`` functions give both tables from one scoring pass.

Blocks default to the official's own row blocks (10 equal blocks) when they fit the memory budget,
so the float32 dot products are the same BLAS calls as the official's, bit for bit.
NumPy only: this module never imports Paddle.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "DEFAULT_KS",
    "paired_ranks",
    "multi_caption_ranks",
    "recall_row",
    "official_recall",
    "multi_caption_recall",
    "official_recall_both",
    "multi_caption_recall_both",
    "tie_gap",
    "tie_warning",
    "percent_table",
    "format_table",
]

DEFAULT_KS = (1, 5, 10)
MAX_CHUNK_ROWS = 1024
SCORE_BLOCK_BYTES = 64 << 20  # float32 scores of one block of query rows
PREPASS_ROWS = 256  # rows per positive-score block of the pre-pass (less work than 512; far
# smaller blocks take other BLAS kernels, whose rounding would force the recount)
TIES = ("optimistic", "pessimistic")
TIE_WARN_POINTS = 1.0  # R@1 gap (percentage points) between the two tie rules worth a warning
LANE_MAX = 255  # a byte lane of a uint64 sum of 0/1 bytes counts up to 255
TILE_ROWS = 17  # score rows compared while in cache (17 x 10k floats: 680 KB); divides LANE_MAX


def _row_blocks(n: int, n_candidates: int, chunk_size: int | None) -> list[tuple[int, int]]:
    """Query row blocks [a, b). Never a 1-row block (NumPy would call gemv, which rounds
    differently from gemm) unless there is only one row."""
    if chunk_size is None:
        budget = max(2, min(MAX_CHUNK_ROWS, SCORE_BLOCK_BYTES // (4 * max(n_candidates, 1))))
        official = n // 10 if n % 10 == 0 else 0
        # the official's own blocks when near the budget: then the BLAS calls are identical
        size = official if 2 <= official <= 2 * budget else budget
    else:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        size = max(2, chunk_size)
    blocks = [(a, min(n, a + size)) for a in range(0, n, size)]
    if len(blocks) > 1 and blocks[-1][1] - blocks[-1][0] == 1:
        blocks[-2:] = [(blocks[-2][0], n)]
    return blocks


def _check_embeddings(name: str, a) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] array, got shape {a.shape}")
    if a.dtype != np.float32:  # the official scores float32 embeddings
        a = a.astype(np.float32)
    if not np.isfinite(a).all():  # NaN compares False: it would count as a hit
        raise ValueError(f"{name} embeddings contain NaN or infinite values")
    return np.ascontiguousarray(a)


def _rank_positives(queries: np.ndarray, candidates: np.ndarray, positive: np.ndarray,
                    chunk_size: int | None, pessimistic: bool = False):
    """Ranks for scores s(i, j) = queries[i] . candidates[j] with query i's correct candidate
    ``positive[i]``.

    Returns {"optimistic": (query_ranks [n], candidate_ranks [m])} with
      query_ranks[i]     = #{j : s(i, j) > s(i, positive[i])}
      candidate_ranks[j] = #{i : s(i, j) > T_j},  T_j = max over i' with positive[i'] == j of s(i', j)
    and, if ``pessimistic``, "pessimistic": (query_ranks, candidate_ranks) with
      query_ranks[i]     = #{j != positive[i] : s(i, j) >= s(i, positive[i])}
      candidate_ranks[j] = #{i : positive[i] != j and s(i, j) >= T_j}
    Every candidate must be the positive of at least one query.
    """
    n, m = len(queries), len(candidates)
    blocks = _row_blocks(n, m, chunk_size)
    cand_t = candidates.T  # a view, like the official's image.transpose()
    ops = (np.greater, np.greater_equal) if pessimistic else (np.greater,)

    # pre-pass: each candidate's best positive score, from small positive-pair blocks
    threshold = _positive_thresholds(queries, candidates, positive, blocks)

    # one score buffer for all blocks (a fresh one page-faults on every block); matmul into it
    # is the same gemm call as ``queries[a:b] @ cand_t``
    scores_buf = np.empty((max(b - a for a, b in blocks), m), np.float32)
    positive_scores = np.empty(n, np.float32)
    counter = _Counter(n, m, ops)
    for a, b in blocks:
        scores = np.matmul(queries[a:b], cand_t, out=scores_buf[:b - a])
        pos = scores[np.arange(b - a), positive[a:b]]
        positive_scores[a:b] = pos
        counter.add_block(scores, a, pos, threshold)

    exact = np.full(m, -np.inf, np.float32)
    np.maximum.at(exact, positive, positive_scores)
    if not np.array_equal(exact, threshold):  # BLAS rounded a pre-pass block differently
        counter.reset_columns()
        for a, b in blocks:
            scores = np.matmul(queries[a:b], cand_t, out=scores_buf[:b - a])
            counter.add_block(scores, a, None, exact)
    query_ranks, candidate_ranks = counter.result(np.greater)
    ranks = {"optimistic": (query_ranks, candidate_ranks)}
    if pessimistic:
        query_at_least, candidate_at_least = counter.result(np.greater_equal)
        # the count of scores >= s(i, positive[i]) includes that positive itself once
        top_positives = np.bincount(positive[positive_scores == exact[positive]], minlength=m)
        ranks["pessimistic"] = (query_at_least - 1, candidate_at_least - top_positives)
    return ranks


class _Counter:
    """Row and column counts of ``score > threshold`` (and ``>=``) over blocks of score rows.

    A tile of TILE_ROWS rows is compared with its thresholds while it is in cache, into a 0/1
    byte mask; the mask is summed as uint64 words, eight bytes at a time with no widening: each
    byte of a word sum is an independent lane that holds a count up to LANE_MAX. (Comparing the
    whole block, then reducing the bool mask to int64, took over twice as long.)
    """

    def __init__(self, n: int, m: int, ops):
        self.m, self.ops = m, ops
        # columns padded to whole groups of LANE_MAX words: a row sum is one reshape + reduce
        width = -(-m // (8 * LANE_MAX)) * 8 * LANE_MAX
        self.mask = np.zeros((TILE_ROWS, width), bool)  # padding columns stay False
        self.rows = {op: np.empty(n, np.int64) for op in ops}
        self.cols = {op: np.zeros(width, np.int64) for op in ops}
        self.lanes = {op: np.zeros(width // 8, np.uint64) for op in ops}

    def reset_columns(self) -> None:
        for cols in self.cols.values():
            cols[:] = 0

    def add_block(self, scores, row0: int, pos, threshold) -> None:
        """Count a block of score rows (row0: its first query's index): each row against its
        ``pos`` (None: no row counts), each column against ``threshold``."""
        m = self.m
        pending = 0  # mask rows summed into the lanes since they were last emptied
        for t0 in range(0, len(scores), TILE_ROWS):
            tile = scores[t0:t0 + TILE_ROWS]
            k = len(tile)
            mask = self.mask[:k]
            words = mask.view(np.uint64)
            if pending + k > LANE_MAX:
                self._flush()
                pending = 0
            for op in self.ops:
                if pos is not None:
                    op(tile, pos[t0:t0 + k, None], out=mask[:, :m])
                    lanes = words.reshape(k, -1, LANE_MAX).sum(axis=2)  # [k, groups] uint64
                    self.rows[op][row0 + t0:row0 + t0 + k] = lanes.view(np.uint8).sum(
                        axis=1, dtype=np.int64)
                op(tile, threshold, out=mask[:, :m])
                self.lanes[op] += np.add.reduce(words, axis=0)
            pending += k
        self._flush()

    def _flush(self) -> None:
        for op, lanes in self.lanes.items():
            self.cols[op] += lanes.view(np.uint8)
            lanes[:] = 0

    def result(self, op) -> tuple[np.ndarray, np.ndarray]:
        """(row counts [n], column counts [m]) of ``op`` (np.greater or np.greater_equal)."""
        return self.rows[op], self.cols[op][:self.m]


def _positive_thresholds(queries, candidates, positive, blocks) -> np.ndarray:
    threshold = np.full(len(candidates), -np.inf, np.float32)
    for a, b in blocks:
        parts = -(-(b - a) // PREPASS_ROWS)
        for k in range(parts):  # near-equal sub-blocks: no tiny remainder block
            lo, hi = a + (b - a) * k // parts, a + (b - a) * (k + 1) // parts
            pos = positive[lo:hi]
            cols, inverse = np.unique(pos, return_inverse=True)
            if cols[-1] - cols[0] + 1 == len(cols):  # contiguous (the official protocol): a view
                block = queries[lo:hi] @ candidates[cols[0]:cols[-1] + 1].T
            else:
                block = queries[lo:hi] @ candidates[cols].T
            np.maximum.at(threshold, pos, block[np.arange(hi - lo), inverse])
    return threshold


def _check_ties(ties: str) -> None:
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")


def _paired(text, image, chunk_size, pessimistic):
    text = _check_embeddings("text", text)
    image = _check_embeddings("image", image)
    if text.shape != image.shape:
        raise ValueError(f"text {text.shape} and image {image.shape} must have the same shape")
    return _rank_positives(text, image, np.arange(len(text)), chunk_size, pessimistic)


def paired_ranks(text, image, chunk_size: int | None = None,
                 ties: str = "optimistic") -> tuple[np.ndarray, np.ndarray]:
    """Official protocol: line i's text and line i's image are each other's only match.

    Returns (text_to_image_ranks [N], image_to_text_ranks [N]), ties counted as ``ties`` says.
    """
    _check_ties(ties)
    return _paired(text, image, chunk_size, ties == "pessimistic")[ties]


def _multi_caption(text, image, image_ids, chunk_size, pessimistic):
    text = _check_embeddings("text", text)
    image = _check_embeddings("image", image)
    if text.shape != image.shape:
        raise ValueError(f"text {text.shape} and image {image.shape} must have the same shape")
    if len(image_ids) != len(text):
        raise ValueError(f"{len(image_ids)} image ids for {len(text)} embedding lines")
    index: dict = {}
    first_line: list[int] = []
    positive = np.empty(len(text), np.int64)
    for i, key in enumerate(image_ids):
        j = index.setdefault(key, len(index))
        if j == len(first_line):
            first_line.append(i)
        positive[i] = j
    images = image[np.asarray(first_line)]
    return _rank_positives(text, images, positive, chunk_size, pessimistic), list(index)


def multi_caption_ranks(text, image, image_ids: Sequence, chunk_size: int | None = None,
                        ties: str = "optimistic"):
    """Several captions per image: lines with the same image id share one image.

    The images are the distinct ids in first-appearance order, each with the image embedding of
    its first line. Text2Image: a text's rank among the images. Image2Text: an image's rank is
    that of its best-ranked caption (it hits R@K if ANY of its captions is in the top K texts).

    Returns (text_to_image_ranks [N], image_to_text_ranks [M], distinct ids [M]).
    """
    _check_ties(ties)
    ranks, ids = _multi_caption(text, image, image_ids, chunk_size, ties == "pessimistic")
    return (*ranks[ties], ids)


def recall_row(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """{"R@k": share of ranks < k, ..., "meanRecall": their mean}, in the official's float64
    arithmetic (count / float(n); (r1 + r5 + r10) / 3.0) so the printed digits match."""
    ranks = np.asarray(ranks)
    n = float(len(ranks))
    if not n:
        raise ValueError("no queries")
    values = [(ranks < k).sum() / n for k in ks]
    total = values[0]
    for v in values[1:]:
        total = total + v
    row = {f"R@{k}": float(v) for k, v in zip(ks, values)}
    row["meanRecall"] = float(total / float(len(ks)))
    return row


def _table_rows(t2i_ranks, i2t_ranks, ks) -> dict[str, dict[str, float]]:
    t2i, i2t = recall_row(t2i_ranks, ks), recall_row(i2t_ranks, ks)
    mean = {k: (np.float64(t2i[k]) + np.float64(i2t[k])) / 2 for k in t2i}
    return {"Text2Image": t2i, "Image2Text": i2t,
            "MeanRecall": {k: float(v) for k, v in mean.items()}}


def official_recall(text, image, ks: Sequence[int] = DEFAULT_KS, chunk_size: int | None = None,
                    ties: str = "optimistic") -> dict[str, dict[str, float]]:
    """The official eval_retri.py rows (as fractions; format_table prints them as the official).

    Returns {"Text2Image": {...}, "Image2Text": {...}, "MeanRecall": {...}}, each row
    {"R@1", "R@5", "R@10", "meanRecall"}. Unlike the official, N need not be a multiple of 10.
    ``ties="pessimistic"`` counts tied wrong candidates against the query (module docstring).
    """
    t2i, i2t = paired_ranks(text, image, chunk_size, ties)
    return _table_rows(t2i, i2t, ks)


def multi_caption_recall(text, image, image_ids: Sequence, ks: Sequence[int] = DEFAULT_KS,
                         chunk_size: int | None = None,
                         ties: str = "optimistic") -> dict[str, dict[str, float]]:
    """Rows like official_recall, with the multi-caption protocol (see multi_caption_ranks)."""
    t2i, i2t, _ = multi_caption_ranks(text, image, image_ids, chunk_size, ties)
    return _table_rows(t2i, i2t, ks)


def official_recall_both(text, image, ks: Sequence[int] = DEFAULT_KS,
                         chunk_size: int | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """{"optimistic": rows, "pessimistic": rows} (rows as official_recall) from one scoring pass."""
    ranks = _paired(text, image, chunk_size, pessimistic=True)
    return {ties: _table_rows(*ranks[ties], ks) for ties in TIES}


def multi_caption_recall_both(text, image, image_ids: Sequence, ks: Sequence[int] = DEFAULT_KS,
                              chunk_size: int | None = None):
    """{"optimistic": rows, "pessimistic": rows} (rows as multi_caption_recall), one scoring pass."""
    ranks, _ = _multi_caption(text, image, image_ids, chunk_size, pessimistic=True)
    return {ties: _table_rows(*ranks[ties], ks) for ties in TIES}


def tie_gap(both: dict[str, dict[str, dict[str, float]]], key: str = "R@1") -> float:
    """The largest optimistic - pessimistic difference of ``key`` over Text2Image and Image2Text,
    in percentage points as printed (two decimals); ``both`` as the ``*_both`` functions return."""
    pct = {ties: percent_table(rows) for ties, rows in both.items()}
    return max(round(pct["optimistic"][name][key] - pct["pessimistic"][name][key], 2)
               for name in ("Text2Image", "Image2Text"))


def tie_warning(both, key: str = "R@1", points: float = TIE_WARN_POINTS) -> str | None:
    """A one-line warning when ties inflate ``key`` by more than ``points``, else None."""
    gap = tie_gap(both, key)
    if gap <= points:
        return None
    pct = {ties: percent_table(rows) for ties, rows in both.items()}
    rows = ", ".join(f"{name} {pct['optimistic'][name][key]:.2f} vs "
                     f"{pct['pessimistic'][name][key]:.2f}" for name in ("Text2Image", "Image2Text"))
    return (f"tied scores: {key} is {gap:.2f} points higher when ties count for the query "
            f"(optimistic, the official) than against it (pessimistic): {rows}; "
            "identical embeddings tie: the same image or caption on several lines, or collapsed "
            "(identical or zero) rows")


def percent_table(rows: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The numbers the official prints: round(x * 100, 2) on NumPy float64 (NumPy's rounding,
    which can differ from Python's round() on a float)."""
    return {name: {k: float(round(np.float64(v) * 100, 2)) for k, v in row.items()}
            for name, row in rows.items()}


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """The official table: tabulate github format, two decimals, values in percent; headers
    "Name" and the row keys (official: R@1, R@5, R@10, meanRecall)."""
    from tabulate import tabulate

    if not rows:
        raise ValueError("no rows to print")
    headers = ["Name"] + list(next(iter(rows.values())))
    table = [[name] + [round(np.float64(v) * 100, 2) for v in row.values()]
             for name, row in rows.items()]
    return tabulate(table, headers=headers, tablefmt="github", floatfmt=".2f")
