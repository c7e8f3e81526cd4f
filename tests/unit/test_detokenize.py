"""TextAssembler over a fake byte-level vocabulary: held-back UTF-8 and stop strings."""

from __future__ import annotations

from collections.abc import Sequence

from llmos.services.runtime.detokenize import REPLACEMENT, TextAssembler


class Vocab:
    """Token ids handed out for byte strings; decodes like a byte-level BPE tokenizer."""

    def __init__(self) -> None:
        self.pieces: dict[int, bytes] = {}
        self.ids: dict[bytes, int] = {}

    def id(self, piece: str | bytes) -> int:
        raw = piece.encode() if isinstance(piece, str) else piece
        if raw not in self.ids:
            self.ids[raw] = len(self.pieces)
            self.pieces[len(self.pieces)] = raw
        return self.ids[raw]

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def run(pieces: Sequence[str | bytes], stop: Sequence[str] = ()) -> tuple[TextAssembler, list[str]]:
    vocab = Vocab()
    assembler = TextAssembler(vocab.decode, stop)
    deltas = [assembler.push(vocab.id(piece)) for piece in pieces]
    return assembler, deltas


def test_deltas_concatenate_to_the_full_text() -> None:
    assembler, deltas = run(["Hel", "lo", ",", " wor", "ld"])

    assert deltas == ["Hel", "lo", ",", " wor", "ld"]
    assert assembler.flush() == ""
    assert assembler.text == "Hello, world"
    assert not assembler.stopped


def test_nothing_pushed_is_empty() -> None:
    assembler = TextAssembler(Vocab().decode, ["END"])

    assert assembler.text == ""
    assert assembler.flush() == ""


def test_multibyte_character_split_over_two_tokens_is_held_until_complete() -> None:
    assembler, deltas = run(["caf", b"\xc3", b"\xa9", "!"])

    assert deltas == ["caf", "", "é", "!"]
    assert REPLACEMENT not in "".join(deltas)
    assert assembler.text == "café!"


def test_four_byte_character_split_over_three_tokens() -> None:
    emoji = "😀".encode()

    _, deltas = run(["a", emoji[:2], emoji[2:3], emoji[3:], "b"])

    assert deltas == ["a", "", "", "😀", "b"]


def test_stop_string_split_across_tokens_is_never_released() -> None:
    assembler, deltas = run(["The answer E", "N", "D and more"], stop=["END"])

    assert deltas == ["The answer ", "", ""]
    assert assembler.stopped
    assert assembler.text == "The answer "
    assert assembler.flush() == ""


def test_stop_string_inside_one_token_cuts_the_text_there() -> None:
    assembler, deltas = run(["Hi", " there END after"], stop=["END"])

    assert deltas == ["Hi", " there "]
    assert assembler.stopped


def test_stop_string_at_the_very_start_releases_nothing() -> None:
    assembler, deltas = run(["\n\nhello"], stop=["\n\n"])

    assert deltas == [""]
    assert assembler.stopped
    assert assembler.text == ""


def test_text_that_starts_like_a_stop_string_but_diverges_is_released() -> None:
    assembler, deltas = run(["x E", "N", "OUGH", " said"], stop=["END"])

    assert deltas == ["x ", "", "ENOUGH", " said"]
    assert not assembler.stopped
    assert assembler.text == "x ENOUGH said"


def test_the_longest_possible_start_of_a_stop_string_is_held() -> None:
    _, deltas = run(["xa", "a", "c"], stop=["aab"])

    assert deltas == ["x", "", "aac"]


def test_stop_string_with_a_split_multibyte_character() -> None:
    assembler, deltas = run(["x", b"\xc3", b"\xa9", "!"], stop=["é!"])

    assert deltas == ["x", "", "", ""]
    assert assembler.stopped
    assert assembler.text == "x"


def test_flush_releases_what_was_held_for_a_stop_string() -> None:
    assembler, deltas = run(["done E"], stop=["END"])

    assert deltas == ["done "]
    assert assembler.flush() == "E"
    assert assembler.text == "done E"
    assert assembler.flush() == ""


def test_flush_releases_an_incomplete_character_at_the_end() -> None:
    assembler, deltas = run(["a", b"\xc3"])

    assert deltas == ["a", ""]
    assert assembler.flush() == REPLACEMENT


def test_empty_stop_strings_are_ignored() -> None:
    assembler, deltas = run(["a", "b"], stop=[""])

    assert deltas == ["a", "b"]
    assert not assembler.stopped


def test_any_of_several_stop_strings_stops() -> None:
    assembler, deltas = run(["one", "</", "s>"], stop=["\n", "</s>"])

    assert deltas == ["one", "", ""]
    assert assembler.stopped


# With several stop strings in one token, the earliest in the text wins, not the first listed.
def test_the_earliest_of_several_stop_strings_wins() -> None:
    assembler, deltas = run(["line one\nmore</s>"], stop=["</s>", "\n"])

    assert deltas == ["line one"]
    assert assembler.stopped


class CountingVocab(Vocab):
    """Records how many ids each decode call was given."""

    def __init__(self) -> None:
        super().__init__()
        self.decoded_lengths: list[int] = []

    def decode(self, ids: Sequence[int]) -> str:
        self.decoded_lengths.append(len(ids))
        return super().decode(ids)


def test_each_token_is_decoded_with_a_short_context_not_the_whole_sequence() -> None:
    vocab = CountingVocab()
    assembler = TextAssembler(vocab.decode, ["END"])
    pieces = [" word"] * 500 + ["caf", b"\xc3", b"\xa9"] + [" more"] * 500

    deltas = [assembler.push(vocab.id(piece)) for piece in pieces]

    assert "".join(deltas) == "".join(
        p.decode() if isinstance(p, bytes) else p for p in pieces if p not in (b"\xc3", b"\xa9")
    ).replace("caf", "café")
    assert max(vocab.decoded_lengths) <= 4


def test_incremental_text_equals_decoding_everything_at_every_step() -> None:
    vocab = Vocab()
    assembler = TextAssembler(vocab.decode)
    emoji = "😀".encode()
    pieces: list[str | bytes] = ["a", emoji[:1], emoji[1:3], " b", emoji[3:], "c", b"\xff", "d"]
    ids: list[int] = []
    for piece in pieces:
        ids.append(vocab.id(piece))
        assembler.push(ids[-1])
        assert vocab.decode(ids).startswith(assembler.text)

    assert assembler.text + assembler.flush() == vocab.decode(ids)


class SpaceDroppingVocab(Vocab):
    """Like SentencePiece: a decode drops the leading space of its first piece."""

    def decode(self, ids: Sequence[int]) -> str:
        text = super().decode(ids)
        return text[1:] if text.startswith(" ") else text


def test_a_tokenizer_that_drops_a_leading_space_keeps_the_spaces_between_words() -> None:
    vocab = SpaceDroppingVocab()
    assembler = TextAssembler(vocab.decode)

    deltas = [assembler.push(vocab.id(piece)) for piece in ["Hello", " big", " world"]]

    assert "".join(deltas) == "Hello big world"
