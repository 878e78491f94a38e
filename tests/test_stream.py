"""Streaming generation (`rag.TextStream`): the pieces add up to what `generate` writes, stop strings
end the text without leaking into it, and closing stops the work. The text checks use the packaged model
(a tiny random one writes mostly blanks); the others a tiny in-memory model."""

import pytest

from ragrpo.generation.rag import TextStream, _held_back, generate

CONVERSATION = [{"role": "user", "content": "Name a film about a lighthouse."}]


@pytest.mark.integration
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_stream_equals_generate(base_model, penalty):
    model, tokenizer = base_model
    [expected] = generate(model, tokenizer, [CONVERSATION], max_new_tokens=12, repetition_penalty=penalty)
    stream = TextStream(model, tokenizer, CONVERSATION, max_new_tokens=12, repetition_penalty=penalty)
    pieces = list(stream)
    assert len(pieces) > 3 and "".join(pieces) == stream.text == expected.strip()
    assert stream.completion_tokens == 12 and stream.finish_reason == "length"
    assert stream.prompt_tokens == len(tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True,
                                                                     return_dict=True)["input_ids"])


@pytest.mark.integration
def test_frequency_penalty_is_the_same_on_the_engine_and_on_the_fallback_forward(base_model, monkeypatch):
    """OpenAI's penalties through the decode engine and through the fallback for models it does not cover give
    the same greedy answer, and one with fewer repeated tokens than the unpenalised answer."""
    from ragrpo.generation import engine

    model, tokenizer = base_model
    settings = {"max_new_tokens": 24, "min_new_tokens": 24}
    plain = TextStream(model, tokenizer, CONVERSATION, **settings).read()
    penalised = TextStream(model, tokenizer, CONVERSATION, frequency_penalty=1.0, presence_penalty=0.5, **settings)
    penalised.read()
    monkeypatch.setattr(engine, "fresh_projections", lambda model: None)  # as for an architecture it lacks
    fallback = TextStream(model, tokenizer, CONVERSATION, frequency_penalty=1.0, presence_penalty=0.5, **settings)
    assert fallback.read() == penalised.text != plain

    def repeats(text):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return len(ids) - len(set(ids))

    assert repeats(penalised.text) < repeats(plain)


@pytest.mark.integration
def test_stop_string_ends_the_text(base_model):
    model, tokenizer = base_model
    full = TextStream(model, tokenizer, CONVERSATION, max_new_tokens=12).read()
    stop = full[len(full) // 2:len(full) // 2 + 3]
    stream = TextStream(model, tokenizer, CONVERSATION, max_new_tokens=12, stop=[stop])
    pieces = list(stream)
    assert stream.finish_reason == "stop" and stream.completion_tokens < 12
    assert "".join(pieces) == stream.text == full[:full.index(stop)]


def test_min_tokens_keeps_the_end_of_turn_out(tiny_causal_lm):
    model, tokenizer = tiny_causal_lm
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    # Make the end-of-turn token the model's first choice by raising its output bias.
    import torch

    with torch.no_grad():
        head = model.get_output_embeddings()
        bias = torch.zeros(head.weight.shape[0])
        bias[tokenizer.eos_token_id] = 1e4
        head.bias = torch.nn.Parameter(bias)
    assert TextStream(model, tokenizer, CONVERSATION, max_new_tokens=8).read() == ""
    stream = TextStream(model, tokenizer, CONVERSATION, max_new_tokens=8, min_new_tokens=5)
    stream.read()
    assert stream.completion_tokens == 5 and stream.finish_reason == "stop"


@pytest.mark.integration
def test_close_stops_generation(base_model):
    model, tokenizer = base_model
    stream = TextStream(model, tokenizer, CONVERSATION, max_new_tokens=50)
    next(stream)
    stream.close()
    assert list(stream) == [] and stream.completion_tokens < 50 and stream.finish_reason is None


@pytest.mark.parametrize("text,stops,held", [
    ("Hello wor", ["world"], 3), ("Hello", ["lo!"], 2), ("Hello", ["xyz"], 0), ("Hello", [], 0), ("ab", ["abc"], 2),
])
def test_held_back_is_the_possible_start_of_a_stop_string(text, stops, held):
    assert _held_back(text, stops) == held


def test_prompt_over_the_context_is_refused(tiny_causal_lm):
    from ragrpo import RagrpoError

    model, tokenizer = tiny_causal_lm
    with pytest.raises(RagrpoError, match="exceeds the model's context of 1024"):
        TextStream(model, tokenizer, [{"role": "user", "content": "word " * 1100}], max_new_tokens=4)


@pytest.mark.integration
def test_ask_streams_to_the_terminal_and_json_gives_one_object(movie_db, base_model_dir):
    import json
    import os
    import subprocess
    import sys
    import time

    args = [sys.executable, "-m", "ragrpo.cli", "ask", "Which film is about a beekeeper who poisoned the honey?",
            "--table", "movies", "--db", str(movie_db), "-k", "2", "--max-new-tokens", "24"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    arrivals = []  # (seconds, bytes) of every read: a streamed answer arrives in many reads over time
    while chunk := os.read(process.stdout.fileno(), 65536):
        arrivals.append((time.monotonic(), chunk))
    assert process.wait(timeout=600) == 0, process.stderr.read()
    output = b"".join(chunk for _, chunk in arrivals).decode()
    answer, _, sources = output.partition("\n\nSources:\n")
    assert answer.strip() and sources.splitlines()[0] == "  [1] The Beekeeper's Confession (1997)"
    before_sources = [t for t, chunk in arrivals if b"Sources:" not in chunk]
    assert len(before_sources) >= 3 and before_sources[-1] - before_sources[0] > 0.05

    result = subprocess.run([*args, "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    reply = json.loads(line)
    assert reply["answer"] == answer.strip() and reply["finish_reason"] in ("stop", "length")
    assert 0 < reply["completion_tokens"] <= 24 and reply["prompt_tokens"] > 100
    assert len(reply["sources"]) == 2 and reply["sources"][0]["label"] == "The Beekeeper's Confession (1997)"
    assert "movie_plot" not in reply["sources"][0]


@pytest.mark.integration
def test_ask_marks_the_source_the_answer_words_come_from(movie_db, base_model_dir, monkeypatch):
    """Whatever the model cites, `ask` marks the passage its answer's words are drawn from: here an answer
    made of words only the second passage holds, written with a "[1]" citation."""
    import json

    from click.testing import CliRunner

    from ragrpo.cli import main
    from ragrpo.generation import rag
    from ragrpo.retrieval.index import open_table

    question = "Which film is about a beekeeper who poisoned the honey?"
    hits, column = rag.retrieve(open_table("movies", movie_db), question, k=2)
    first, second = (set(h[column].lower().replace(".", " ").replace(",", " ").split()) for h in hits)
    only_second = sorted(w for w in second - first if w.isalpha() and len(w) > 6)[:4]
    assert len(only_second) == 4
    answer = " ".join(only_second) + " [1]"
    monkeypatch.setattr(rag, "generate", lambda *a, **kw: [f"<think>x</think><answer>{answer}</answer>"])
    args = ["ask", question, "--table", "movies", "--db", str(movie_db), "-k", "2", "--reasoning"]
    outcome = CliRunner().invoke(main, args)
    assert outcome.exit_code == 0, outcome.output
    lines = outcome.output.split("Sources:\n")[1].splitlines()
    assert "drawn from this one" in lines[1] and "drawn from" not in lines[0]
    record = json.loads(CliRunner().invoke(main, [*args, "--json"]).output)
    assert record["answer"] == answer and record["drawn_from"] == 2
