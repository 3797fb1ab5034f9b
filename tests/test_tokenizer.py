"""Tokenizers: ids against independent references (UTF-8 bytes, tiktoken, transformers), round trips, errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinylm.data.corpus import Corpus
from tinylm.data.tokenizer import load_tokenizer, tokenizer_stats
from tinylm.data.tokenizer_training import build_tokenizer
from tinylm.errors import TinylmError
from tinylm.infer.text import TextStream
from tinylm.recipe import TokenizerConfig, load_recipe

SAMPLE = Path("../shared/data/tinystories/TinyStories-train-sample-2995stories.txt.gz")
ODD = ["", " ", "a", "Once upon a time", "  two leading, trailing two  ", "tab\there\n\nnew para\n",
       "héllo wörld — “curly” ‘quotes’ 日本語 🙂\u200b", "it's they're I'LL we've 123 4567.89", "\r\n\x01\x7f",
       "<s> </s> <|endoftext|> literal specials"]
FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def stories() -> list[str]:
    return list(Corpus([SAMPLE], max_stories=700))


@pytest.fixture(scope="module")
def toks(stories, tmp_path_factory):
    """Each kind built once, saved, and read back with tinylm and with transformers."""
    from transformers import PreTrainedTokenizerFast

    configs = {
        "bytes": load_recipe("micromixer-1m").tokenizer,
        "bytes_specials": TokenizerConfig(kind="bytes", vocab_size=258),
        "bpe": TokenizerConfig(kind="bpe", vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"]),
        "aurelius": load_recipe("aurelius-10m").tokenizer,
        "chars": load_recipe("simpler-llama-834k").tokenizer,
        "gpt2": load_recipe("godelev-190m").tokenizer,
    }
    folder = tmp_path_factory.mktemp("tokenizers")
    out = {}
    for name, config in configs.items():
        built = build_tokenizer(config, stories[:400])
        built.save(folder / f"{name}.json")
        out[name] = (built, load_tokenizer(folder / f"{name}.json"),
                     PreTrainedTokenizerFast(tokenizer_file=str(folder / f"{name}.json")), folder / f"{name}.json")
    return out


KINDS = ["bytes", "bytes_specials", "bpe", "aurelius", "chars", "gpt2"]


@pytest.mark.parametrize("name", KINDS)
def test_transformers_gives_identical_ids(toks, stories, name):
    built, loaded, hf, _ = toks[name]
    texts = stories[400:700] + ODD[1:-1]
    ours = loaded.encode_batch(texts)
    assert ours == built.encode_batch(texts) == [loaded.encode(t) for t in texts]
    assert ours == [hf.encode(t, add_special_tokens=False) for t in texts]
    assert loaded.fingerprint() == built.fingerprint()
    for text in stories[400:450]:
        ids = loaded.encode(text)
        assert hf.decode(ids, skip_special_tokens=True) == loaded.decode(ids)


def test_bytes_ids_are_utf8_bytes_and_specials_follow(toks):
    plain, specials = toks["bytes"][1], toks["bytes_specials"][1]
    for text in ODD:
        assert plain.encode(text) == list(text.encode("utf-8"))
        assert plain.decode(plain.encode(text)) == text
    assert plain.vocab_size == 256 and plain.special_ids == {} and plain.bos_id is None
    assert specials.vocab_size == 258 and (specials.bos_id, specials.eos_id) == (256, 257)
    assert specials.encode("<s>") == list(b"<s>")  # a special token's text in the input stays text
    assert specials.decode([256, 104, 105, 257]) == "hi"
    assert specials.decode([0xC3, 0xA9, 0xFF]) == "é\ufffd"  # bytes that are not UTF-8 decode with a replacement


def test_aurelius_specials_suffix_space_and_post_processor(toks):
    ours, _, hf, path = toks["aurelius"]
    assert ours.special_ids == {"<s>": 0, "</s>": 1, "<pad>": 2, "<sink>": 3}
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.sink_id) == (0, 1, 2, 3)
    ids = ours.encode("Once upon a time")
    # suffix space: each word carries its trailing space (Ġ is the byte-level symbol of " ")
    assert [ours.id_to_token(i) for i in ids[:3]] == ["OnceĠ", "uponĠ", "aĠ"]
    assert hf.encode("Once upon a time") == [3, 0, *ids]
    assert hf.encode("Once upon a time", "The end") == [3, 0, *ids, 1, *ours.encode("The end")]
    definition = json.loads(path.read_text())
    assert definition["post_processor"]["type"] == "TemplateProcessing"
    assert [n["pattern"]["Regex"] for n in definition["normalizer"]["normalizers"]] == [r"\z", r"\s\s+\z"]


def test_auto_tokenizer_applies_the_sink_template(toks, tmp_path):
    from transformers import AutoTokenizer

    ours, _, _, path = toks["aurelius"]
    (tmp_path / "tokenizer.json").write_bytes(path.read_bytes())
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    assert auto("Once upon a time")["input_ids"] == [3, 0, *ours.encode("Once upon a time")]


def test_trailing_space_normaliser_ends_every_text_in_one_space(toks):
    ours = toks["aurelius"][1]
    assert ours.encode("The end") == ours.encode("The end ") == ours.encode("The end \n\t  ")
    assert ours.decode(ours.encode("Tom ran.\n\nHe fell.\n")) == "Tom ran.\n\nHe fell. "  # inner lines untouched
    assert ours.encode("") == []


def _onig_rstrip(text: str) -> str:
    # Oniguruma's \s is Python's whitespace minus the four separators \x1c-\x1f
    while text and text[-1].isspace() and text[-1] not in "\x1c\x1d\x1e\x1f":
        text = text[:-1]
    return text


@FAST
@given(text=st.text(max_size=200))
def test_round_trip_any_unicode(toks, text):
    for name in ("bytes", "bytes_specials", "bpe", "gpt2"):
        ours = toks[name][1]
        assert ours.decode(ours.encode(text)) == text, name
    aurelius = toks["aurelius"][1]
    assert aurelius.decode(aurelius.encode(text)) == (_onig_rstrip(text) + " " if text else "")


@FAST
@given(text=st.text(alphabet=" \n\tabcdefghijklmnopqrstuvwxyzABC.,!?'\"", max_size=120))
def test_chars_round_trip_known_characters(toks, text):
    ours, _, hf, _ = toks["chars"]
    ids = ours.encode(text)
    assert len(ids) == len(text)
    assert ours.decode(ids) == hf.decode(ids) == text


def test_chars_vocabulary_follows_frequency(toks, stories):
    ours = toks["chars"][1]
    assert ours.vocab_size == 361
    assert ours.special_ids == {"<unk>": 0, "<s>": 1, "</s>": 2} and ours.unk_id == 0
    counts = Counter("".join(stories[:400]))
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    assert [ours.id_to_token(3 + i) for i in range(5)] == [ch for ch, _ in top]
    assert ours.encode("a\u4e00b") == [ours.encode("a")[0], 0, ours.encode("b")[0]]  # unseen -> <unk>
    stats = tokenizer_stats(ours, ["ab\u4e00"])
    assert stats["unknown_fraction"] == pytest.approx(1 / 3)


def test_gpt2_known_ids_and_no_ranks_file_needed_after_saving(toks, monkeypatch, tmp_path):
    ours = toks["gpt2"][1]
    assert ours.encode("hello world") == [31373, 995]
    assert ours.encode("Once upon a time") == [7454, 2402, 257, 640]
    assert ours.vocab_size == 50257 and ours.bos_id == ours.eos_id == 50256
    assert ours.encode("<|endoftext|>") != [50256] and ours.decode([50256, 31373]) == "hello"
    monkeypatch.setenv("TINYLM_GPT2_RANKS", str(tmp_path / "absent"))
    monkeypatch.chdir(tmp_path)
    again = load_tokenizer(toks["gpt2"][3])
    assert again.encode("hello world") == [31373, 995]


def test_gpt2_ranks_path_errors(monkeypatch, tmp_path):
    config = TokenizerConfig(kind="gpt2", vocab_size=50257, special_tokens=["<|endoftext|>"], bos="", eos="",
                             ranks_path=str(tmp_path / "missing.tiktoken"))
    with pytest.raises(TinylmError, match="ranks file not found"):
        build_tokenizer(config)
    (tmp_path / "bad.tiktoken").write_text("not base64 at all\n")
    config.ranks_path = str(tmp_path / "bad.tiktoken")
    with pytest.raises(TinylmError):
        build_tokenizer(config)


def test_gpt2_matches_tiktoken_reference(toks, stories):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(Path("../shared/data/gpt2/gpt2.tiktoken")))
    pattern = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    reference = tiktoken.Encoding(name="ref", pat_str=pattern, mergeable_ranks=ranks,
                                  special_tokens={"<|endoftext|>": 50256})
    lines = [line for story in stories[:150] for line in story.splitlines() if line][:400]
    hf = toks["gpt2"][2]
    assert [hf.encode(t, add_special_tokens=False) for t in lines] == reference.encode_ordinary_batch(lines)


def test_bpe_specials_first_and_vocab_size(toks, stories):
    ours = toks["bpe"][1]
    assert ours.special_ids == {"<unk>": 0, "<s>": 1, "</s>": 2} and ours.vocab_size == 600
    assert ours.decode([1, *ours.encode("The cat sat."), 2]) == "The cat sat."
    assert ours.decode([9999, *ours.encode("x")]) == "x"  # ids outside the vocabulary are skipped
    with pytest.raises(TinylmError, match="too small"):
        build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=257), stories[:10])
    with pytest.raises(TinylmError, match="too small"):
        build_tokenizer(TokenizerConfig(kind="bytes", vocab_size=256))  # + <s> </s> does not fit
    with pytest.raises(TinylmError, match="training text"):
        build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300), [])
    with pytest.raises(TinylmError, match="unknown"):
        build_tokenizer(TokenizerConfig(kind="chars", vocab_size=50), ["abc"])


def test_fingerprint_tracks_the_definition(toks, stories):
    a = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300), stories[:50])
    b = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300), stories[:50])
    c = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300), stories[50:100])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert len({toks[k][1].fingerprint() for k in KINDS}) == len(KINDS)


def test_save_is_atomic_and_load_errors(toks, tmp_path):
    toks["bytes"][1].save(tmp_path / "run" / "tokenizer.json")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["tokenizer.json"]
    assert load_tokenizer(tmp_path / "run").kind == "bytes"  # a run directory works too
    with pytest.raises(TinylmError, match="not found"):
        load_tokenizer(tmp_path / "nowhere.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TinylmError):
        load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "odd.json").write_text('{"model": {"type": "Nonsense"}}')
    with pytest.raises(TinylmError):
        load_tokenizer(tmp_path / "odd.json")


def test_foreign_tokenizer_json_roles_are_inferred(toks, tmp_path):
    definition = json.loads(toks["aurelius"][3].read_text())
    del definition["model"]["tinylm"]
    (tmp_path / "t.json").write_text(json.dumps(definition))
    loaded = load_tokenizer(tmp_path / "t.json")
    assert (loaded.kind, loaded.bos_id, loaded.eos_id, loaded.sink_id) == ("bpe", 0, 1, 3)
    assert loaded.encode("Once upon") == toks["aurelius"][1].encode("Once upon")


@FAST
@given(data=st.data())
def test_streamed_text_is_the_whole_text(toks, data):
    """Incremental decoding (infer/text.py) shows, piece by piece, exactly the text of all the ids, for every kind,
    whatever ids come (parts of UTF-8 characters and specials included)."""
    for name in KINDS:
        ours = toks[name][1]
        ids = data.draw(st.lists(st.integers(0, ours.vocab_size - 1), max_size=40), label=name)
        stream, shown = TextStream(ours), ""
        for n in range(1, len(ids) + 1):
            shown += stream.update(ids[:n])[0]
            assert ours.decode(ids[:n]).startswith(shown), name
        whole, rest = stream.finish(ids)
        assert shown + rest == whole == ours.decode(ids), name


def test_streamed_text_keeps_the_spaces_of_a_metaspace_decoder(tmp_path):
    """A SentencePiece-style decoder drops the space that starts a text: each new piece is decoded after the ids
    before it, so the space between words is not lost."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    foreign = Tokenizer(models.WordLevel({"▁Once": 0, "▁upon": 1, "▁a": 2, "▁time": 3, "<unk>": 4}, unk_token="<unk>"))
    foreign.pre_tokenizer, foreign.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    foreign.save(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(tmp_path / "tokenizer.json")
    ids = ours.encode("Once upon a time")
    stream = TextStream(ours)
    pieces = [stream.update(ids[:n])[0] for n in range(1, len(ids) + 1)]
    assert pieces == ["Once", " upon", " a", " time"]
