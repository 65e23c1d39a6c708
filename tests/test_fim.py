"""Fill-in-the-middle: rate, PSM/SPM split, exact formats, determinism, and undoing it gives the
document back."""

import math
import random

import pytest

from nanocode.fim import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, apply_fim
from tests.helpers import fim_mode, make_docs, trained_tokenizer, undo_fim

DOCS = make_docs(40, seed=1) + ["", "x", "λ🙂数据\n" * 7]


@pytest.fixture(scope="module")
def tok():
    return trained_tokenizer(make_docs(50, seed=2))


def encode_pieces(tok, pieces):
    ids = []
    for p in pieces:
        ids += tok.encode(p) if isinstance(p, str) else [p]
    return ids


def test_special_ids_match_tokenizer(tok):
    assert (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX) == (9, 10, 11)
    assert tok.special_id("<|fim_prefix|>") == FIM_PREFIX
    assert tok.special_id("<|fim_middle|>") == FIM_MIDDLE
    assert tok.special_id("<|fim_suffix|>") == FIM_SUFFIX


def test_rate_and_split_within_bounds():
    n, rng = 8000, random.Random(0)
    modes = [fim_mode(apply_fim(DOCS[i % len(DOCS)], rng)) for i in range(n)]
    n_fim = n - modes.count("none")
    # 5 standard deviations: a correct implementation fails this about once in 2 million runs
    assert abs(n_fim / n - 0.5) < 5 * math.sqrt(0.25 / n)
    assert abs(modes.count("spm") / n_fim - 0.5) < 5 * math.sqrt(0.25 / n_fim)
    # other rates are honoured too
    rates = [fim_mode(apply_fim("abc" * 50, rng, fim_rate=0.1)) != "none" for _ in range(n)]
    assert abs(sum(rates) / n - 0.1) < 5 * math.sqrt(0.09 / n)
    assert all(fim_mode(apply_fim("abc", rng, fim_rate=0.0)) == "none" for _ in range(100))


def test_formats_are_exactly_psm_and_spm():
    text = "def add(a, b):\n    return a + b\n"
    seen = set()
    for seed in range(200):
        pieces = apply_fim(text, random.Random(seed), fim_rate=1.0)
        mode = fim_mode(pieces)
        seen.add(mode)
        specials = [p for p in pieces if isinstance(p, int)]
        if mode == "psm":
            _, prefix, _, suffix, _, middle = pieces
            assert [type(p) for p in pieces] == [int, str, int, str, int, str]
            assert specials == [FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE]
        else:
            _, _, suffix, _, prefix, middle = pieces
            assert [type(p) for p in pieces] == [int, int, str, int, str, str]
            assert specials == [FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE]
        assert prefix + middle + suffix == text
    assert seen == {"psm", "spm"}


def test_cut_points_cover_the_document():
    """Both cut points are uniform over all character positions, including the two ends."""
    text = "abcdefghij"
    prefix_lengths = set()
    for seed in range(2000):
        pieces = apply_fim(text, random.Random(seed), fim_rate=1.0)
        prefix = pieces[1] if fim_mode(pieces) == "psm" else pieces[4]
        prefix_lengths.add(len(prefix))
    assert prefix_lengths == set(range(len(text) + 1))


def test_deterministic_for_a_seed():
    for doc in DOCS:
        assert apply_fim(doc, random.Random(7)) == apply_fim(doc, random.Random(7))
    outs = {str(apply_fim(DOCS[0], random.Random(s), fim_rate=1.0)) for s in range(20)}
    assert len(outs) > 5  # and different seeds cut differently


def test_never_cuts_inside_a_character(tok):
    text = "é🙂数据λ" * 30
    for seed in range(300):
        for p in apply_fim(text, random.Random(seed), fim_rate=1.0):
            if isinstance(p, str):
                # every piece is whole characters: its tokens decode back to it exactly (strict
                # UTF-8)
                assert tok.encoding.decode_bytes(tok.encode(p)).decode("utf-8") == p


def test_undo_fim_on_encoded_example_gives_back_the_document(tok):
    modes = set()
    for seed in range(150):
        doc = DOCS[seed % len(DOCS)]
        pieces = apply_fim(doc, random.Random(seed))
        ids = encode_pieces(tok, pieces)
        modes.add(fim_mode(ids))
        assert undo_fim(ids, tok.decode) == doc
    assert modes == {"none", "psm", "spm"}


def test_document_containing_special_text_is_still_unambiguous(tok):
    doc = 'marker = "<|fim_middle|>"\nother = "<|fim_suffix|>"\n' * 3
    for seed in range(50):
        ids = encode_pieces(tok, apply_fim(doc, random.Random(seed), fim_rate=1.0))
        assert sum(i in (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX) for i in ids) == 3
        assert undo_fim(ids, tok.decode) == doc
