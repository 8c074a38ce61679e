"""Preference data: TRL row formats, bad rows stop with file:line, tokenisation masks prompts and padding."""

import json

import pytest
from steer.training.pairs import (
    IGNORE_INDEX,
    Encoder,
    PairExample,
    UnpairedExample,
    collate,
    encode_examples,
    pairs_to_unpaired,
    read_examples,
)

from steer.conditioning import render_prompt
from steer.errors import InvalidInput


def write_jsonl(path, rows, blank_after=None):
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


SYSTEM = {"role": "system", "content": "Be brief."}


def test_reads_standard_conversational_and_implicit_rows(tmp_path):
    rows = [
        {"prompt": "What is DNS?", "chosen": "A naming system.", "rejected": "No idea.", "extra": 1},
        {"prompt": [SYSTEM, {"role": "user", "content": "Hi"}],
         "chosen": [{"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "assistant", "content": "Go away."}]},
        {"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
         "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]},
    ]
    examples = read_examples([write_jsonl(tmp_path / "p.jsonl", rows, blank_after=1)])
    assert [type(e) for e in examples] == [PairExample] * 3
    assert examples[0].prompt == ({"role": "user", "content": "What is DNS?"},)
    assert examples[1].prompt[0] == SYSTEM and examples[1].chosen == "Hello!" and examples[1].rejected == "Go away."
    assert (examples[2].prompt == ({"role": "user", "content": "2+2?"},)
            and (examples[2].chosen, examples[2].rejected) == ("4", "5"))
    # The blank line is skipped but counted: the third row sits on line 4.
    assert [e.where.rsplit(":", 1)[1] for e in examples] == ["1", "3", "4"]


def test_reads_kto_rows_and_parquet(tmp_path):
    rows = [{"prompt": "Q", "completion": "good", "label": True}, {"prompt": "Q", "completion": "bad", "label": False}]
    examples = read_examples([write_jsonl(tmp_path / "k.jsonl", rows)])
    assert [(type(e), e.label) for e in examples] == [(UnpairedExample, True), (UnpairedExample, False)]
    import datasets

    path = tmp_path / "p.parquet"
    datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"},
                                {"prompt": "d", "chosen": "f", "rejected": "e"}]).to_parquet(str(path))
    parquet = read_examples([path])
    assert parquet[1].chosen == "f" and parquet[1].where == f"{path}:row 2"
    empty = tmp_path / "empty.parquet"
    datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"},
                                {"prompt": "d", "chosen": "", "rejected": "e"}]).to_parquet(str(empty))
    with pytest.raises(InvalidInput, match=rf"^{empty}:row 2: chosen: is empty"):
        read_examples([empty])


BAD_ROWS = [
    ('{"prompt": "a", "chosen": "b"', "not valid JSON"),
    ('["a", "b"]', "must be a JSON object"),
    ('{"prompt": "a", "chosen": "b"}', "rejected: is missing"),
    ('{"prompt": "a", "chosen": "b", "rejected": "b"}', "rejected: is identical to chosen"),
    ('{"prompt": "  ", "chosen": "b", "rejected": "c"}', "prompt: is blank"),
    ('{"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "chosen": "b", '
     '"rejected": "c"}', "prompt[1].role"),
    ('{"prompt": [{"role": "wizard", "content": "a"}], "chosen": "b", "rejected": "c"}', "prompt[0].role"),
    ('{"prompt": "a", "chosen": [{"role": "user", "content": "b"}], "rejected": "c"}',
     "chosen: a conversational completion"),
    ('{"prompt": "a", "completion": "b", "label": "yes"}', "label: must be true or false"),
    ('{"prompt": "a", "chosen": 3, "rejected": "c"}', "chosen"),
    ('{"prompt": "a", "chosen": "", "rejected": "c"}', "chosen: is empty"),
    ('{"prompt": "a", "chosen": "b", "rejected": " \\n "}', "rejected: is empty"),
    ('{"prompt": "a", "chosen": [{"role": "assistant", "content": ""}], "rejected": "c"}',
     "chosen[0].content: is empty"),
    ('{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}], '
     '"rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "c"}]}',
     "chosen[0].content: is empty"),
    ('{"prompt": "a", "completion": "", "label": true}', "completion: is empty"),
]


@pytest.mark.parametrize("line,reason", BAD_ROWS)
def test_bad_row_names_file_line_and_column(tmp_path, line, reason):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "chosen": "x", "rejected": "y"}\n\n' + line + "\n")
    with pytest.raises(InvalidInput) as e:
        read_examples([path])
    assert str(e.value).startswith(f"{path}:3: "), str(e.value)
    assert reason in str(e.value)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_bytes_that_are_not_utf8_name_file_line_and_column(tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    good = b'{"prompt": "ok", "chosen": "x", "rejected": "y"}'
    if suffix == ".jsonl":
        path.write_bytes(good + b"\n\n" + b'{"prompt": "caf\xe9", "chosen": "x", "rejected": "y"}\n')
    else:  # one JSON array over several lines
        path.write_bytes(b"[\n" + good + b",\n" + b'{"prompt": "caf\xe9", "chosen": "x", "rejected": "y"}\n]\n')
    with pytest.raises(InvalidInput) as e:
        read_examples([path])
    assert str(e.value) == f"{path}:3: not valid UTF-8 (byte 0xe9 at column 16); save the file as UTF-8"


def test_mixed_formats_and_file_errors(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"},
                                              {"prompt": "a", "completion": "b", "label": True}])
    with pytest.raises(InvalidInput, match=r"m.jsonl:2: mixes formats"):
        read_examples([path])
    with pytest.raises(InvalidInput, match="no such file"):
        read_examples([tmp_path / "missing.jsonl"])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(InvalidInput, match="unsupported file type"):
        read_examples([tmp_path / "x.csv"])
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(InvalidInput, match="has no rows"):
        read_examples([tmp_path / "empty.jsonl"])


def test_tokenisation_masks_prompt_and_padding(tokenizer):
    enc = Encoder(tokenizer, max_length=64, max_prompt_length=48)
    prompt = ({"role": "user", "content": "Name a colour."},)
    finished = enc.encode(prompt, "Blue", eos=True)
    cut = enc.encode(prompt, "Blue and then some more words", eos=False)
    # The prompt is the chat template with the assistant header, tokenised on its own.
    prompt_ids = tokenizer(render_prompt(tokenizer, list(prompt), None), add_special_tokens=False)["input_ids"]
    assert list(finished.input_ids[: finished.prompt_len]) == prompt_ids
    completion = list(finished.input_ids[finished.prompt_len:])
    assert completion == tokenizer("Blue", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.eos_token_id not in cut.input_ids[cut.prompt_len:]  # a truncated sample does not learn to stop

    batch = collate([finished, cut], pad_id=tokenizer.pad_token_id)
    assert batch.input_ids.shape == (2, len(cut.input_ids)) and len(cut.input_ids) > len(finished.input_ids)
    for row, seq in enumerate([finished, cut]):
        n = len(seq.input_ids)
        assert batch.attention_mask[row, :n].all() and not batch.attention_mask[row, n:].any()
        assert (batch.labels[row, : seq.prompt_len] == IGNORE_INDEX).all()
        assert (batch.labels[row, n:] == IGNORE_INDEX).all()
        assert batch.labels[row, seq.prompt_len:n].tolist() == list(seq.input_ids[seq.prompt_len:])


def test_truncation_keeps_prompt_end_and_cuts_completion(tokenizer):
    enc = Encoder(tokenizer, max_length=40, max_prompt_length=24)
    prompt = ({"role": "user", "content": "word " * 50},)
    seq = enc.encode(prompt, "answer " * 50)
    full_prompt = enc.prompt_ids(prompt)
    assert seq.prompt_truncated and seq.prompt_len == 24 and len(seq.input_ids) == 40
    assert list(seq.input_ids[:24]) == full_prompt[-24:]  # ends with the assistant header


def test_kto_examples_get_mismatched_kl_completions(tokenizer):
    pairs = [PairExample(({"role": "user", "content": f"Q{i}"},), f"good {i}", f"bad {i}") for i in range(2)]
    unpaired = pairs_to_unpaired(pairs)
    assert [(u.completion, u.label) for u in unpaired] == [
        ("good 0", True), ("bad 0", False), ("good 1", True), ("bad 1", False)]
    enc = Encoder(tokenizer, 64, 48)
    encoded = encode_examples(unpaired, enc)
    # Example i's KL sequence is its own prompt with example (i + 1)'s completion.
    for i, e in enumerate(encoded):
        own, kl = e.sequences
        other = enc.encode(unpaired[(i + 1) % 4].prompt, unpaired[(i + 1) % 4].completion)
        assert own.input_ids[: own.prompt_len] == kl.input_ids[: kl.prompt_len]
        assert kl.input_ids[kl.prompt_len:] == other.input_ids[other.prompt_len:]
        assert e.label == unpaired[i].label
