"""engine.output: deltas that join to the full text, with UTF-8 and stop strings held back."""

import pytest

from engine.output import Detokenizer

TEXTS = [
    "Plain ASCII text, with punctuation; and numbers 12345.",
    "Café, naïve façade — crème brûlée à la carte.",
    "東京は日本の首都です。大阪は二番目に大きい都市です。",
    "Emoji: 🙂🚀 and a family 👨‍👩‍👧 mixed with text.",
    "  leading spaces\n\nand blank lines\t\ttabs  ",
]


def deltas(tokenizer, ids, stop=()):
    d = Detokenizer(tokenizer, stop)
    out = []
    for t in ids:
        stopped = d.push(t)
        out.append(d.release())
        if stopped:
            break
    out.append(d.release(final=True))
    return d, out


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_join_to_the_full_decode_and_never_hold_a_broken_character(smollm2_loaded, text):
    tokenizer = smollm2_loaded.tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    d, out = deltas(tokenizer, ids)
    assert "".join(out) == tokenizer.decode(ids, skip_special_tokens=True) == d.text
    assert not any("\ufffd" in piece for piece in out)
    if any("\ufffd" in tokenizer.decode([i]) for i in ids):  # a character split across tokens was held back
        assert any(piece == "" for piece in out[:-1])


def test_a_stop_string_spanning_tokens_cuts_the_text_and_is_never_sent(smollm2_loaded):
    tokenizer = smollm2_loaded.tokenizer
    text = "The quick brown fox jumps over the lazy dog near the riverbank."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([i]) for i in ids]
    k = next(k for k in range(1, len(pieces)) if len(pieces[k - 1]) >= 3 and len(pieces[k]) >= 3)
    stop = pieces[k - 1][-2:] + pieces[k][:2]  # the end of one token and the start of the next
    d, out = deltas(tokenizer, ids, stop=(stop,))
    assert d.stopped
    full = tokenizer.decode(ids)
    assert "".join(out) == full[: full.index(stop)]
    assert all(stop not in piece for piece in out) and stop not in "".join(out)


def test_text_that_only_might_become_a_stop_string_is_released_at_the_end(smollm2_loaded):
    tokenizer = smollm2_loaded.tokenizer
    ids = tokenizer("Hello world, END", add_special_tokens=False)["input_ids"]
    d, out = deltas(tokenizer, ids, stop=("END OF TEXT",))
    assert not d.stopped
    assert out[-1].endswith("END")  # held back until the final release, then sent
    assert "".join(out) == "Hello world, END"


def test_the_first_of_several_stop_strings_wins(smollm2_loaded):
    tokenizer = smollm2_loaded.tokenizer
    ids = tokenizer("alpha beta gamma delta", add_special_tokens=False)["input_ids"]
    d, out = deltas(tokenizer, ids, stop=("delta", "beta"))
    assert "".join(out) == "alpha " and d.stopped


def test_token_bytes_are_each_tokens_own_and_join_to_the_text(smollm2_loaded):
    """Byte-level BPE splits "日本" into tokens that end mid-character: decode([id]) gives U+FFFD for them, while
    their bytes joined are the text's UTF-8."""
    from engine.output import TokenBytes

    tok = smollm2_loaded.tokenizer
    text = "héllo — 日本"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = TokenBytes(tok)
    assert b"".join(pieces.bytes(i) for i in ids) == text.encode()
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # what the server reported before
    assert all("\ufffd" not in pieces.text(i) for i in ids)
    assert any(pieces.text(i).startswith("bytes:\\x") for i in ids)
    assert pieces.text(tok.eos_token_id) == tok.eos_token
