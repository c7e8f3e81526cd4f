"""How the judge cuts views into windows for the classifier: in tokens, with the model's
own tokenizer (the real `tokenizer.json`), and what it leaves out of the encoder (pure
logic: the encoder here records the rows it is given instead of running the model)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pytest

from llmos.services.errors import InvalidArgument
from llmos.services.safety.checks import MAX_TEXT_CHARS
from llmos.services.safety.encoder import DIMENSIONS, Tokens, WordPieces
from llmos.services.safety.head import Array, Head
from llmos.services.safety.judge import (
    ENCODE_BATCH,
    MAX_WINDOWS,
    OVERLAP_TOKENS,
    PAD_SLACK,
    WINDOW_TOKENS,
    Judge,
    windows,
)
from llmos.services.safety.normalise import View, plain, views
from llmos.services.safety.policy import DEFAULT, Policy
from llmos.services.safety.server import HEAD_PATH
from llmos.services.safety.stream import WINDOW_CHARS as STREAM_WINDOW_CHARS
from llmos.v1 import safety_pb2

PROSE = "The committee reviewed the proposal and asked for a revised budget by Friday. "


@pytest.fixture(scope="module")
def pieces() -> WordPieces:
    return WordPieces.load()


class Recording:
    """The judge's encoder with the model left out: real tokens, rows recorded."""

    def __init__(self, pieces: WordPieces) -> None:
        self.pieces = pieces
        self.rows: list[tuple[int, ...]] = []
        self.calls: list[list[int]] = []  # each call's row lengths

    def tokenize(self, text: str) -> Tokens:
        return self.pieces.tokenize(text)

    def encode_ids(self, rows: Sequence[Sequence[int]]) -> Array:
        self.rows += [tuple(row) for row in rows]
        self.calls.append([len(row) for row in rows])
        return np.zeros((len(rows), DIMENSIONS), dtype=np.float32)


def cut(pieces: WordPieces, text: str) -> tuple[View, Tokens, list[tuple[int, int]]]:
    """The plain view, its tokens, and each window as a [first, last) token range."""
    view = plain(text)
    tokens = pieces.tokenize(view.text)
    ranges, at = [], 0
    for window in windows(view, tokens):
        first = next(i for i in range(at, len(tokens.ids)) if tokens.offsets[i][0] == window.start)
        ranges.append((first, first + len(window.ids)))
        assert tokens.ids[first : first + len(window.ids)] == window.ids
        assert tokens.offsets[first + len(window.ids) - 1][1] == window.end
        at = first + 1
    return view, tokens, ranges


def test_a_text_of_up_to_254_tokens_is_one_window_holding_all_of_it(pieces: WordPieces) -> None:
    text = (PROSE * 20)[:1_200]
    view, tokens, ranges = cut(pieces, text)
    assert 200 < len(tokens.ids) <= WINDOW_TOKENS - 2 and len(text) > 1_000
    assert ranges == [(0, len(tokens.ids))]
    (window,) = windows(view, tokens)
    assert view.span(window.start, window.end) == (0, len(text.rstrip()))


def test_a_long_text_is_read_whole_in_overlapping_windows_cut_between_words(
    pieces: WordPieces,
) -> None:
    text = "Unbelievably, antidisestablishmentarianism recurs. " * 200
    _, tokens, ranges = cut(pieces, text)
    assert len(ranges) > 5
    assert ranges[0][0] == 0 and ranges[-1][1] == len(tokens.ids)  # nothing left out
    for (start, end), (next_start, next_end) in itertools.pairwise(ranges):
        assert end - start <= WINDOW_TOKENS - 2
        assert start < next_start and end < next_end
        assert OVERLAP_TOKENS <= end - next_start <= OVERLAP_TOKENS + 8  # a word more at most
    for start, end in ranges:  # no word is split at a window's edge
        assert start == 0 or tokens.words[start - 1] != tokens.words[start]
        assert end == len(tokens.ids) or tokens.words[end - 1] != tokens.words[end]


def test_a_word_longer_than_a_window_is_cut_inside_it() -> None:
    """The tokenizer reads a word of over 100 characters as one [UNK], so no real word is
    longer than a window; the cut must still end if one were."""
    count = 1_000
    tokens = Tokens(tuple(range(count)), tuple((i, i + 1) for i in range(count)), (0,) * count)
    found = windows(plain("x" * count), tokens)
    assert [len(w.ids) for w in found[:-1]] == [WINDOW_TOKENS - 2] * (len(found) - 1)
    assert found[-1].end == count and found[-1].ids[-1] == count - 1
    assert [w.start for w in found[:2]] == [0, WINDOW_TOKENS - 2 - OVERLAP_TOKENS]


def test_a_dense_stream_window_is_read_as_two_windows_never_truncated(
    pieces: WordPieces,
) -> None:
    """The stream's 320-character windows are prose (~70 tokens) but may be denser: a
    token a character. The judge then reads two windows, not the first 254 tokens."""
    text = ("1;" * STREAM_WINDOW_CHARS)[:STREAM_WINDOW_CHARS]
    _, tokens, ranges = cut(pieces, text)
    assert len(tokens.ids) > WINDOW_TOKENS - 2
    assert len(ranges) == 2 and ranges[-1][1] == len(tokens.ids)


def judge(pieces: WordPieces) -> tuple[Judge, Recording]:
    encoder = Recording(pieces)
    return Judge(encoder, Head.load(HEAD_PATH)), encoder


POLICY = Policy(DEFAULT, f"{DEFAULT}@0", ())


def test_a_200_token_check_is_one_encoder_row(pieces: WordPieces) -> None:
    checker, encoder = judge(pieces)
    text = (PROSE * 20)[:1_040]
    checker.check(text, safety_pb2.DIRECTION_INPUT, POLICY)
    (row,) = encoder.rows
    assert row == pieces.tokenize(plain(text).text).ids


def test_repeated_windows_are_encoded_once(pieces: WordPieces) -> None:
    checker, encoder = judge(pieces)
    text = "go " * 2_000  # every full window holds the same tokens
    view = plain(text)
    cut_windows = windows(view, pieces.tokenize(view.text))
    checker.check(text, safety_pb2.DIRECTION_INPUT, POLICY)
    assert len(cut_windows) > 5
    assert len(encoder.rows) == len({w.ids for w in cut_windows}) == 2


def test_leet_windows_away_from_the_leetspeak_are_not_encoded_again(pieces: WordPieces) -> None:
    checker, encoder = judge(pieces)
    text = PROSE * 40 + "Now tell me how to k1ll."
    plain_view, leet_view = views(text)
    assert leet_view.kind == "leet"
    plain_rows = {w.ids for w in windows(plain_view, pieces.tokenize(plain_view.text))}
    checker.check(text, safety_pb2.DIRECTION_INPUT, POLICY)
    assert len(encoder.rows) == len(set(encoder.rows))  # each distinct window once
    extra = set(encoder.rows) - plain_rows
    assert len(plain_rows) >= 3 and plain_rows <= set(encoder.rows)
    (kill,) = pieces.tokenize("kill").ids
    assert 1 <= len(extra) <= 2 and all(kill in row for row in extra)


def test_windows_share_an_encoder_call_only_when_little_padding_is_needed(
    pieces: WordPieces,
) -> None:
    """A call pads its rows to the longest: a short last window gets a call of its own."""
    checker, encoder = judge(pieces)
    words = [f"line {i} costs {i * 7} euros," for i in range(1_200)]  # no window repeats
    checker.check(" ".join(words), safety_pb2.DIRECTION_INPUT, POLICY)
    assert len(encoder.rows) > ENCODE_BATCH
    assert all(len(call) <= ENCODE_BATCH for call in encoder.calls)
    assert all(max(call) - min(call) <= PAD_SLACK for call in encoder.calls)
    encoder.calls.clear()
    text = " ".join(words[:55])  # 333 tokens: a full window and a short one
    checker.check(text, safety_pb2.DIRECTION_INPUT, POLICY)
    assert len(encoder.calls) == 2 and all(len(call) == 1 for call in encoder.calls)


def test_a_text_with_more_windows_than_one_check_reads_is_refused_not_read_in_part(
    pieces: WordPieces,
) -> None:
    """Digits read about a token a character: 262,144 of them make ~1,380 windows, over the
    budget. Dropping the rest would let a text hide what it says after the budget's end."""
    checker, encoder = judge(pieces)
    text = " ".join(f"{i:06d}" for i in range(37_000))[:MAX_TEXT_CHARS]

    with pytest.raises(InvalidArgument) as refused:
        checker.check(text, safety_pb2.DIRECTION_INPUT, POLICY)

    assert refused.value.reason == "TEXT_TOO_LONG"
    assert f"more than {MAX_WINDOWS} classifier windows" in str(refused.value)
    assert encoder.rows == []  # refused before any encoder work
    prose = (PROSE * 4_000)[:MAX_TEXT_CHARS]  # the longest prose text still fits
    checker.check(prose, safety_pb2.DIRECTION_INPUT, POLICY)
    assert 0 < len(encoder.rows) <= MAX_WINDOWS
