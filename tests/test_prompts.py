"""Training prompts: templates over columns, `prompt` columns of text or chat messages, length limits."""

import json

import pytest

from ragrpo import RagrpoError
from ragrpo.config import build_run_config
from ragrpo.data import read_records
from ragrpo.tuning.train import build_dataset, build_prompts


@pytest.fixture(scope="module")
def tokenizer(base_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model_dir)


def test_builtin_default_template_gives_chat_prompts(tokenizer):
    dataset = build_dataset(build_run_config(max_samples=5), tokenizer)
    assert len(dataset) == 5
    [message] = dataset[0]["prompt"]
    assert message["role"] == "user"
    assert message["content"].startswith("Summarize this movie plot in one sentence:\n")


def test_template_uses_original_or_index_column_names(tokenizer):
    frame = read_records("builtin:movies").head(2)
    raw = build_prompts(frame, "builtin:movies", "{Title}: {Plot}", tokenizer, 512)
    renamed = build_prompts(frame, "builtin:movies", "{title}: {movie_plot}", tokenizer, 512)
    assert raw == renamed
    assert raw[0][0]["content"] == f"{frame['Title'][0]}: {frame['Plot'][0]}"


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_prompt_column_text_or_messages_and_other_columns_travel(tmp_path, tokenizer):
    text = _jsonl(tmp_path / "text.jsonl", [{"prompt": "Once upon a time", "context": ["a", "b"]}])
    dataset = build_dataset(build_run_config(dataset=text), tokenizer)
    assert dataset[0] == {"prompt": "Once upon a time", "context": ["a", "b"]}
    chat = _jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "user", "content": "Hello"}], "query": "q"}])
    dataset = build_dataset(build_run_config(dataset=chat), tokenizer)
    assert dataset[0] == {"prompt": [{"role": "user", "content": "Hello"}], "query": "q"}
    mixed = _jsonl(tmp_path / "mixed.jsonl", [{"prompt": "text"}, {"prompt": [{"role": "user", "content": "Hi"}]}])
    with pytest.raises(RagrpoError, match="mixes plain text and chat messages"):
        build_dataset(build_run_config(dataset=mixed), tokenizer)


def test_long_prompts_are_cut_to_max_prompt_length(tokenizer):
    frame = read_records("builtin:movies").head(1)
    frame.loc[0, "Plot"] = "word " * 2000
    [messages] = build_prompts(frame, "builtin:movies", "Summarize:\n{Plot}", tokenizer, 64)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= 64
    assert messages[0]["content"].startswith("Summarize:\nword")  # the instruction survives


def test_bad_prompts(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": 42}) + "\n")
    with pytest.raises(RagrpoError, match="neither text nor a list of chat messages"):
        build_dataset(build_run_config(dataset=str(path)), tokenizer)
    with pytest.raises(RagrpoError, match="not a valid format string"):
        build_prompts(read_records("builtin:movies"), "builtin:movies", "{Plot", tokenizer, 512)
