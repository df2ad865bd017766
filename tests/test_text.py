"""Text in, text out: the tokenizer files, the chat template, streaming, stop tokens and strings,
and `run_example.py --mode generate --prompt`. The tokenizer is built here (text_fixture.py)."""

import json
import os

import numpy as np
import pytest

from mimo_v2_flash import MiMoV2FlashModel, load_config
from mimo_v2_flash.text import TextStream, TextTokenizer, TokenizerError, generate_text
from mimo_prepare_weights import download as download_module

from text_fixture import SPECIAL_TOKENS, write_tokenizer

END_OF_TEXT, IM_START, IM_END = range(3)   # special token ids: trained first, in SPECIAL_TOKENS order


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return TextTokenizer.from_dir(tokenizer_dir)


@pytest.fixture(scope="module")
def model():
    return MiMoV2FlashModel.random("tiny", seed=4)


def test_encode_decode_round_trip_and_special_tokens(tokenizer):
    assert [tokenizer.tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [END_OF_TEXT, IM_START, IM_END]
    text = "héllo wörld ✓ the quick fox"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    # Special tokens are matched whole when encoding and left out when decoding.
    ids = tokenizer.encode(f"the fox{SPECIAL_TOKENS[2]}dog")
    assert IM_END in ids
    assert tokenizer.decode(ids) == "the foxdog"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "the fox<|im_end|>dog"


def test_end_of_turn_tokens(tokenizer_dir, tmp_path):
    # eos_token of tokenizer_config and ChatML's <|im_end|>; generation_config's ids join them.
    assert TextTokenizer.from_dir(tokenizer_dir).stop_token_ids == [END_OF_TEXT, IM_END]
    write_tokenizer(tmp_path, generation_eos=[IM_START])
    assert TextTokenizer.from_dir(tmp_path).stop_token_ids == [END_OF_TEXT, IM_START, IM_END]


def test_chat_template_renders_and_encodes_specials_whole(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ✓"}]
    text = tokenizer.render_chat(messages)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi ✓<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tokenizer.encode_chat(messages)
    assert ids.count(IM_START) == 3 and ids.count(IM_END) == 2
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_chat_template_conventions(tmp_path):
    template = ("{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no ' + m.role) }}"
                "{% endif %}{{ m | tojson }}{% if loop.first %}{% continue %}{% endif %}{{ eos_token }}"
                "{% endfor %}")
    write_tokenizer(tmp_path, chat_template=template)
    tok = TextTokenizer.from_dir(tmp_path)
    out = tok.render_chat([{"role": "user", "content": "é"}, {"role": "a", "content": "b"}])
    assert out == '{"role": "user", "content": "é"}{"role": "a", "content": "b"}<|endoftext|>'
    with pytest.raises(TokenizerError, match="chat template: no bad"):
        tok.render_chat([{"role": "bad", "content": ""}])


def test_text_stream_holds_back_split_characters_and_stop_prefixes(tokenizer):
    # "✓" is three UTF-8 bytes; fed one byte-token at a time it appears only when complete.
    byte_ids = [tokenizer.tokenizer.token_to_id(c) for c in "âľĵ"]   # byte-level symbols of ✓
    assert None not in byte_ids and tokenizer.decode(byte_ids) == "✓"
    stream = TextStream(tokenizer)
    assert [stream.push(i) for i in byte_ids] == ["", "", "✓"]
    # A stop string is held back while it may be starting, and the text ends before it.
    stream = TextStream(tokenizer, stop_strings=["fox"])
    pieces = [stream.push(i) for i in tokenizer.encode("the quick brown fox jumps")]
    assert "".join(pieces) == "the quick brown " and stream.stopped
    assert stream.push(tokenizer.encode("x")[0]) == "" and stream.finish() == ""


def test_generate_text_streams_the_decoded_greedy_continuation(model, tokenizer):
    prompt = "the quick"
    ids = tokenizer.encode(prompt)
    pieces = []
    text = generate_text(model, tokenizer, prompt, max_new_tokens=12, on_text=pieces.append)
    tokens = model.generate(np.array([ids]), max_new_tokens=12, stop_tokens=tokenizer.stop_token_ids)[0]
    new = [int(t) for t in tokens[len(ids):]]
    stop_at = next((i for i, t in enumerate(new) if t in tokenizer.stop_token_ids), len(new))
    assert text == tokenizer.decode(new[:stop_at]) and text
    assert "".join(pieces) == text and len(pieces) > 1


def test_generation_stops_at_the_end_of_turn_token(model, tokenizer):
    """A model whose greedy choice at step 3 is made <|im_end|> (the row of lm_head copied; ties
    go to the lower id) stops there: the text is the first two tokens."""
    ids = tokenizer.encode("the quick")
    greedy = [int(t) for t in model.generate(np.array([ids]), max_new_tokens=6, stop_tokens=[])[0, len(ids):]]
    third = greedy[2]
    assert third > IM_END and third not in greedy[:2]
    weights = dict(model.weights)
    weights["lm_head.weight"] = weights["lm_head.weight"].copy()
    weights["lm_head.weight"][IM_END] = weights["lm_head.weight"][third]
    ending = MiMoV2FlashModel(model.config, weights)
    assert generate_text(ending, tokenizer, "the quick", max_new_tokens=6) == tokenizer.decode(greedy[:2])


def test_stop_string_cuts_the_text(model, tokenizer):
    full = generate_text(model, tokenizer, "the quick", max_new_tokens=12)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = generate_text(model, tokenizer, "the quick", max_new_tokens=12, stop_strings=[stop])
    assert cut == full[:full.find(stop)]


def test_chat_generation_uses_the_template(model, tokenizer):
    text = generate_text(model, tokenizer, "Hi", chat=True, max_new_tokens=5)
    ids = tokenizer.encode_chat([{"role": "user", "content": "Hi"}])
    tokens = model.generate(np.array([ids]), max_new_tokens=5, stop_tokens=tokenizer.stop_token_ids)[0, len(ids):]
    new = [int(t) for t in tokens]
    stop_at = next((i for i, t in enumerate(new) if t in tokenizer.stop_token_ids), len(new))
    assert text == tokenizer.decode(new[:stop_at])


def test_missing_or_broken_tokenizer_is_a_clear_error(tmp_path, model, tokenizer_dir):
    with pytest.raises(TokenizerError, match=f"{tmp_path}: no tokenizer.json"):
        TextTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json: cannot read the tokenizer"):
        TextTokenizer.from_dir(tmp_path)
    no_template = tmp_path / "plain"
    write_tokenizer(no_template, chat_template=None)
    with pytest.raises(TokenizerError, match="has no chat_template"):
        TextTokenizer.from_dir(no_template).render_chat([{"role": "user", "content": "x"}])
    small_vocab = MiMoV2FlashModel.random(load_config("tiny").replace(vocab_size=256), seed=0)
    with pytest.raises(TokenizerError, match="outside the model's vocabulary 0..255"):
        generate_text(small_vocab, TextTokenizer.from_dir(tokenizer_dir), "the quick brown fox")


def test_run_example_generate_prompt_prints_text(model, tokenizer, tokenizer_dir, tmp_path, capsys):
    import run_example
    model.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tokenizer_dir / name).read_bytes())
    assert run_example.main(["--mode", "generate", "--weights", str(tmp_path), "--prompt", "the quick",
                             "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr()
    assert out.out == generate_text(model, tokenizer, "the quick", max_new_tokens=8) + "\n"
    assert "characters in" in out.err
    assert run_example.main(["--mode", "generate", "--weights", str(tmp_path), "--chat", "--prompt", "Hi",
                             "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == generate_text(model, tokenizer, "Hi", chat=True, max_new_tokens=4) + "\n"
    os.remove(tmp_path / "tokenizer.json")
    assert run_example.main(["--mode", "generate", "--weights", str(tmp_path), "--prompt", "x"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err


def test_download_fetches_and_copies_the_tokenizer(tokenizer_dir, tmp_path):
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(
        download_module.allow_patterns([]))
    assert download_module.copy_tokenizer_files(str(tokenizer_dir), str(tmp_path)) == [
        "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"
    assert TextTokenizer.from_dir(tmp_path).encode("the fox") == TextTokenizer.from_dir(tokenizer_dir).encode("the fox")
