"""The `ragrpo` command line: each command parses its options, calls one library function, and turns
a `RagrpoError` into one line on stderr with exit code 2."""

from __future__ import annotations

import functools
import json
import os
import sys
import warnings

import click

from ragrpo import RagrpoError

DB_OPTION = click.option("--db", default="lancedb", show_default=True,
                         help="LanceDB folder or object-store URI, e.g. s3://bucket/path.")
STORAGE_OPTION = click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
                              help="LanceDB storage option for an object-store --db, repeatable, e.g. "
                              "aws_region=eu-west-1 (overrides the AWS_* variables).")
MODE_OPTION = click.option("--mode", type=click.Choice(["vector", "fts", "hybrid"]), default="vector",
                           show_default=True, help="Vector search, full-text (BM25), or both fused by "
                           "reciprocal rank fusion.")
RERANK_OPTION = click.option("--rerank", default=None, metavar="MODEL",
                             help="Rerank with this sentence-transformers cross-encoder (name or folder).")


class UserError(click.ClickException):
    exit_code = 2

    def show(self, file=None):
        click.echo(f"Error: {self.message}", err=True)


def user_errors(func):
    """Turn a library RagrpoError into one line and exit code 2; keep warnings from third parties quiet."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("LANCEDB_LOG", "error")  # lance logs "No existing dataset ..." at WARN
        warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices from dependencies
        try:
            from ragrpo.models import quiet_transformers

            quiet_transformers()
            if os.environ.get("RAGRPO_THREADS", "").strip():  # torch is imported only where the count is set
                from ragrpo import hardware

                hardware.apply_threads()
            return func(*args, **kwargs)
        except RagrpoError as exc:
            raise UserError(str(exc)) from None

    return wrapper


@click.group()
@click.version_option(package_name="ragrpo")
def main():
    """GRPO-tune a small language model with reward functions and answer over your own LanceDB table.

    \b
    ragrpo quickstart                      the whole pipeline on built-in data
    ragrpo index builtin:movies --table movies
    ragrpo train --output runs/demo --max-steps 20
    ragrpo ask "Which films end in betrayal?" --table movies --model runs/demo/merged
    """


@main.command()
@click.option("--model", default=None, help="Hugging Face id or folder [default: packaged SmolLM2-135M-Instruct].")
@click.option("--dataset", default=None, help="JSONL/CSV/Parquet file, Hugging Face dataset, or builtin:movies.")
@click.option("--prompt-template", default=None, help='Build prompts from columns, e.g. "Summarize:\\n{movie_plot}".')
@click.option("--reward", "rewards", multiple=True, help="NAME[=WEIGHT], repeatable: a built-in (ragrpo rewards "
              "list), package.module:function or file.py:function.")
@click.option("--preset", default=None, help="default (tuned for short runs) or seed (the write-up's configuration).")
@click.option("--engine", default=None, type=click.Choice(["fast", "trl"]),
              help="fast: bf16 base and a merged sampling copy (same objective); trl: plain GRPOTrainer. "
              "[default: fast with --preset default, trl with --preset seed]")
@click.option("--max-steps", type=int, default=None)
@click.option("--held-out", "held_out", type=float, default=None,
              help="Share of prompts (with --from-index: of documents) kept out of training for `ragrpo eval`. "
              "[default: 0.1]")
@click.option("--num-generations", type=int, default=None, help="G: completions sampled per prompt.")
@click.option("--max-completion-length", type=int, default=None, help="Tokens per completion.")
@click.option("--learning-rate", type=float, default=None)
@click.option("--beta", type=float, default=None, help="KL coefficient to the adapter-free reference model.")
@click.option("--epsilon", type=float, default=None, help="Clipping range of the policy ratio.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML file: top-level run keys plus [grpo] and [lora] tables.")
@click.option("--save-steps", type=int, default=None, help="Checkpoint every N steps (for --resume).")
@click.option("--restart-if", "restart_if", default=None, metavar="REWARD<VALUE@STEP", help="Start the run again on "
              "another seed when the reward averaged below VALUE over steps STEP/2..STEP [from-index default "
              "rewards with --kinds all: answer_match<0.22@100, recorded only].")
@click.option("--restarts", type=int, default=None, help="Restarts the rule may make; 0 only records the check "
              "[default: 1 with --restart-if, 0 for the from-index default rule].")
@click.option("--report-to", default=None, type=click.Choice(["none", "tensorboard", "wandb"]),
              help="Also log to TensorBoard or Weights & Biases (passed to the trainer).")
@click.option("--output", default=None, help="Run folder [default: runs/latest].")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--resume", is_flag=True, help="Continue the run in --output from its last checkpoint, with the "
              "configuration it was started with (other options are ignored).")
@click.option("--from-index", "from_index", default=None, metavar="TABLE",
              help="Train on RAG prompts built from this LanceDB table's own documents (no labels needed).")
@click.option("--db", default="lancedb", show_default=True, help="LanceDB folder or URI (with --from-index).")
@STORAGE_OPTION
@click.option("--where", default=None, help="SQL prefilter for documents and retrieval (with --from-index).")
@click.option("-k", "k", type=int, default=3, show_default=True, help="Passages retrieved per question (with "
              "--from-index; `ask -k` should match).")
@click.option("--mode", type=click.Choice(["vector", "fts", "hybrid"]), default="hybrid", show_default=True,
              help="Search mode for the training questions (with --from-index; `ask --mode` should match).")
@click.option("--questions", type=click.Choice(["templates", "model"]), default="templates", show_default=True,
              help="How questions are made (with --from-index): templates over fields, or written by the model.")
@click.option("--reasoning", is_flag=True, help="Prompts ask for <think> reasoning before an <answer> (with "
              "--from-index; adds the format reward).")
@click.option("--cite/--no-cite", default=True, show_default=True, help="Prompts ask the model to cite the "
              "passage it answers from as [n], as `ask --cite` does (with --from-index).")
@click.option("--max-documents", type=int, default=None, help="Use only the first N documents (with --from-index).")
@click.option("--passage-header", default=None, help="Header of each passage in the prompt, from the table's "
              "columns, e.g. '{title} ({release_year})' [default: the table's title and year columns] (with --from-index).")
@click.option("--order", type=click.Choice(["balanced", "retrieved", "mixed"]), default="balanced", show_default=True,
              help="Passage order in training prompts: the source at each position equally often (seeded), as "
              "retrieved, or mixed: each question's G answers under k orders, the source at each position "
              "(with --from-index).")
@click.option("--kinds", default=None, help="Train on these question kinds, comma-separated, or all: keyword (which "
              "film), when (what year), who, blank (fill the blank), what, summary, model [default: all but keyword "
              "and when, which a passage's header answers, where the table gives others] (with --from-index).")
@click.option("--not-first", default=None, help="Question kinds, comma-separated, whose source is never passage 1 "
              "in a training prompt, e.g. keyword,when with --kinds all (with --from-index).")
@click.option("--not-first-questions", type=int, default=0, show_default=True, help="The first N questions trained "
              "on never show their source as passage 1; the rest are balanced (with --from-index).")
@click.option("--agentic", is_flag=True, help="No passages up front: the model searches the table itself with "
              "<search> query </search> while it answers, and learns from the search rewards (with --from-index).")
@click.option("--max-searches", type=int, default=3, show_default=True, help="Search calls per answer (with --agentic).")
@user_errors
def train(config_file, rewards, overwrite, resume, from_index, db, storage_options, where, k, mode, questions,
          reasoning, cite, max_documents, passage_header, order, kinds, not_first, not_first_questions, agentic,
          max_searches, **options):
    """GRPO fine-tuning with a LoRA adapter; writes adapter/, merged/, config.json and metrics.jsonl.

    Example: ragrpo train --max-steps 20 --reward length --reward token_diversity=0.5 --output runs/demo

    Example: ragrpo train --from-index movies --db lancedb --where "release_year < 1990" --output runs/rag

    Example: ragrpo train --from-index movies --agentic --max-searches 2 --output runs/agentic
    """
    from ragrpo.config import build_run_config
    from ragrpo.tuning.train import train as run_training
    from ragrpo.tuning.train import world

    if agentic and not (from_index or resume):
        raise UserError("--agentic searches a table while training: add --from-index TABLE")
    cfg = build_run_config(config_file, rewards=list(rewards) or None, **options)
    if from_index and not resume:
        from ragrpo.retrieval.index import parse_storage_options
        from ragrpo.tuning.curriculum import IndexSource, from_index_config, parse_kinds, train_from_index

        source = IndexSource(from_index, db, where=where, k=k, mode=mode, questions=questions, reasoning=reasoning,
                             cite=cite, held_out=cfg.held_out, max_documents=max_documents, header=passage_header,
                             order=order, order_seed=cfg.seed, agentic=agentic, max_searches=max_searches,
                             kinds=parse_kinds(kinds), not_first=parse_kinds(not_first),
                             not_first_questions=not_first_questions)
        from ragrpo.config import load_config_file

        given = bool(rewards) or bool(config_file and "rewards" in load_config_file(config_file))
        result, curriculum = train_from_index(from_index_config(cfg, source, given), source, overwrite=overwrite,
                                              storage_options=parse_storage_options(storage_options))
        if world()[0] == 0:  # under `accelerate launch`, the main process speaks for the run
            click.echo(f"{curriculum.train_questions} training questions from {len(curriculum.train_ids)} documents; "
                       f"{len(curriculum.held_ids)} documents held out")
            click.echo(f"trained {result.steps} steps; merged model: {result.merged}; metrics: {result.metrics}")
        return
    if resume:
        from ragrpo.retrieval.index import parse_storage_options
        from ragrpo.tuning.curriculum import resume as resume_run

        result = resume_run(cfg, parse_storage_options(storage_options), overwrite=overwrite)
    else:
        result = run_training(cfg, overwrite=overwrite)
    if world()[0] == 0:
        click.echo(f"trained {result.steps} steps; merged model: {result.merged}; metrics: {result.metrics}")


@main.command()
@click.argument("model_dir")
@click.argument("prompt")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 means greedy decoding.")
@user_errors
def generate(model_dir, prompt, max_new_tokens, temperature):
    """Generate a reply to PROMPT through the chat template of the model in MODEL_DIR.

    Example: ragrpo generate runs/demo/merged "Summarize the plot of a heist film in one sentence."
    """
    from ragrpo.generation.rag import generate as run_generate
    from ragrpo.models import load_model

    model, tokenizer = load_model(model_dir)
    [text] = run_generate(model, tokenizer, [[{"role": "user", "content": prompt}]],
                          max_new_tokens=max_new_tokens, temperature=temperature)
    click.echo(text.strip())


@main.command()
@click.argument("source")
@click.option("--table", required=True, help="Name of the LanceDB table to create.")
@DB_OPTION
@STORAGE_OPTION
@click.option("--text-column", default=None, help="Column to embed [default: movie_plot, text, content, ...].")
@click.option("--rename", "renames", multiple=True, help='OLD=NEW, repeatable, e.g. "Release Year=release_year".')
@click.option("--embedding-model", default=None, help="sentence-transformers name or folder [default: packaged MiniLM].")
@click.option("--overwrite", is_flag=True, help="Replace the table if it exists.")
@click.option("--id-column", default=None, help="Column of unique document ids: re-ingesting upserts by it "
              "(merge_insert on id and chunk) instead of failing on an existing table.")
@click.option("--chunk-size", type=int, default=None, help="Tokens per chunk of long texts, in the embedder's "
              "tokens [default: the most it reads, 254 for MiniLM].")
@click.option("--chunk-overlap", type=int, default=32, show_default=True, help="Tokens shared by consecutive chunks.")
@click.option("--index-threshold", type=int, default=10_000, show_default=True,
              help="Rows from which vector and scalar indexes are built (full-text is always built).")
@click.option("--precision", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True,
              help="Embedding precision: auto uses bf16 where the hardware has it, checked within 1e-3 cosine.")
@click.option("--batch-rows", type=int, default=None,
              help="Documents read, embedded and written at a time [default: 2048]: memory stays flat however "
              "large the input (CSV, JSONL and Parquet files stream; LanceDB commits once, at the end).")
@user_errors
def index(source, table, db, storage_options, text_column, renames, embedding_model, overwrite, id_column,
          chunk_size, chunk_overlap, index_threshold, precision, batch_rows):
    """Embed SOURCE (CSV/JSONL/Parquet, folder of .txt/.md, Hugging Face dataset, builtin:movies) into LanceDB.

    Example: ragrpo index docs/ --table notes --id-column path --chunk-size 200

    Example: ragrpo index builtin:movies --table movies --db s3://my-bucket/lancedb
    """
    from ragrpo.retrieval.index import BATCH_ROWS, parse_renames, parse_storage_options
    from ragrpo.retrieval.index import index as run_index

    result = run_index(source, table, db, text_column=text_column, renames=parse_renames(renames),
                       embedding_model=embedding_model, overwrite=overwrite, id_column=id_column,
                       chunk_size=chunk_size, chunk_overlap=chunk_overlap, index_threshold=index_threshold,
                       precision=precision, progress=True, storage_options=parse_storage_options(storage_options),
                       batch_rows=BATCH_ROWS if batch_rows is None else batch_rows)
    if result.repaired:
        click.echo(f"table {db}/{table} already holds {result.rows} rows but lacked indexes (an interrupted "
                   f"ingest?); built: {', '.join(result.indexes)}. No rows were written; pass --overwrite "
                   f"to re-ingest {source}")
        return
    skipped = f" ({result.skipped_empty} rows with empty text skipped)" if result.skipped_empty else ""
    verb = "upserted" if result.upserted else "indexed"
    click.echo(f"{verb} {result.documents} documents as {result.chunks} chunks into {db}/{table} "
               f"(table now {result.rows} rows){skipped}; text column {result.text_column!r}; "
               f"columns: {', '.join(result.columns)}; indexes built: {', '.join(result.indexes) or 'none'}")


@main.command()
@click.argument("query")
@click.option("--table", required=True)
@DB_OPTION
@STORAGE_OPTION
@click.option("--where", default=None, help='SQL prefilter, e.g. "release_year < 1990".')
@click.option("-k", "k", type=int, default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line: every column but the vector.")
@MODE_OPTION
@RERANK_OPTION
@user_errors
def search(query, table, db, storage_options, where, k, as_json, mode, rerank):
    """Prefiltered search: the K rows best matching QUERY among those matching --where.

    Example: ragrpo search "a detective who is the killer" --table movies --where "release_year < 1990"
    --mode hybrid
    """
    from ragrpo.prompts import source_label
    from ragrpo.retrieval.index import parse_storage_options
    from ragrpo.retrieval.search import score_of, search_table

    rows = search_table(table, query, db=db, where=where, k=k, mode=mode, rerank=rerank,
                        storage_options=parse_storage_options(storage_options))
    for n, row in enumerate(rows, 1):
        if as_json:
            click.echo(json.dumps(row, default=str))
        else:
            name, value = score_of(row)
            click.echo(f"{n}. {source_label(row)}  {name} {value:.3f}")


@main.command()
@click.argument("query")
@click.option("--table", required=True)
@click.option("--model", default=None, help="Model folder, e.g. runs/demo/merged [default: packaged base model].")
@DB_OPTION
@STORAGE_OPTION
@click.option("--where", default=None, help='SQL prefilter, e.g. "release_year < 1990".')
@click.option("-k", "k", type=int, default=None, help="Passages to answer from [default: the model's training "
              "setting (MODEL/ragrpo.json), else 5].")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 means greedy decoding.")
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True,
              help="Above 1 discourages repeating tokens (keeps small models out of loops).")
@click.option("--mode", type=click.Choice(["vector", "fts", "hybrid"]), default=None,
              help="Search mode [default: the model's training setting, else vector].")
@RERANK_OPTION
@click.option("--reasoning/--no-reasoning", default=None, help="Ask for <think> reasoning first; print only the "
              "<answer> [default: the model's training setting, else off].")
@click.option("--cite/--no-cite", default=None, help="Ask the model to cite the passage it answers from as [n] "
              "[default: the model's training setting, else off].")
@click.option("--passage-header", default=None, help="Header of each passage, from the table's columns, e.g. "
              "'{title} ({release_year})' [default: the model's training setting, else the table's title and year].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (answer, sources, token counts) "
              "at the end instead of streaming text.")
@click.option("--agentic", is_flag=True, help="No passages up front: the model searches the table itself "
              "(<search> query </search>), sees the results and answers; each search is printed as it is made.")
@click.option("--max-searches", type=int, default=3, show_default=True, help="Search calls per answer (with --agentic).")
@user_errors
def ask(query, table, model, db, storage_options, where, k, max_new_tokens, temperature, repetition_penalty, mode, rerank,
        reasoning, cite, passage_header, as_json, agentic, max_searches):
    """Retrieve K passages for QUERY, answer from them with the model (streamed as it is written), and list
    the sources, marking the one the answer's words are drawn from (the system's attribution, whatever the
    model cites). With --reasoning the answer is shown once complete, without its <think> part.

    Example: ragrpo ask "What's common in movies where the protagonist is the bad guy" --table movies
    --where "release_year < 1990" --model runs/demo/merged

    Example: ragrpo ask "Who keeps the ferry ledger?" --table movies --agentic --model runs/agentic/merged
    """
    from ragrpo.answer_settings import resolve_settings
    from ragrpo.generation.rag import ask_stream
    from ragrpo.prompts import source_label
    from ragrpo.retrieval.index import parse_storage_options

    storage_options = parse_storage_options(storage_options)
    settings, notices = resolve_settings(model, mode=mode, k=k, cite=cite, reasoning=reasoning, header=passage_header)
    for notice in notices:
        click.echo(notice, err=True)
    mode, k, cite, reasoning, passage_header = (settings.mode, settings.k, settings.cite, settings.reasoning,
                                                settings.header)
    if agentic:
        from ragrpo.generation.agentic import ask_agentic

        if max_searches < 1:
            raise UserError(f"--max-searches must be at least 1, got {max_searches}")
        shown = None if as_json else lambda call: click.echo(
            f"search: {call.query or '(empty)'} -> " + (call.error or f"passages {call.numbers or 'none new'}"))
        result = ask_agentic(query, table, model, db=db, where=where, k=k, mode=mode, header=passage_header,
                             max_searches=max_searches, max_new_tokens=max_new_tokens, temperature=temperature,
                             storage_options=storage_options, on_search=shown)
        answer, sources, drawn = result.text, result.sources, result.drawn_from
        record = {"query": query, "answer": answer, "searches": result.searches, "completion": result.raw}
    elif reasoning:  # the <think> part is not shown, so there is nothing to stream before the answer
        from ragrpo.generation.rag import ask as run_ask

        result = run_ask(query, table, model, db=db, where=where, k=k, max_new_tokens=max_new_tokens,
                         temperature=temperature, repetition_penalty=repetition_penalty, mode=mode, rerank=rerank,
                         reasoning=True, cite=cite, header=passage_header, storage_options=storage_options)
        answer, sources, drawn = result.text, result.sources, result.drawn_from
        record = {"query": query, "answer": answer, "reasoning": result.raw}
    else:
        stream = ask_stream(query, table, model, db=db, where=where, k=k, mode=mode, rerank=rerank, cite=cite,
                            header=passage_header, storage_options=storage_options,
                            max_new_tokens=max_new_tokens, temperature=temperature,
                            repetition_penalty=repetition_penalty)
        if not as_json:
            for piece in stream:
                click.echo(piece, nl=False)
        answer, sources = stream.read(), stream.sources
        drawn = stream.drawn_from()
        record = {"query": query, "answer": answer, "finish_reason": stream.finish_reason,
                  "prompt_tokens": stream.prompt_tokens, "completion_tokens": stream.completion_tokens}
    if as_json:
        record["sources"] = [{"label": source_label(s), **s} for s in sources]
        record["drawn_from"] = drawn
        click.echo(json.dumps(record, default=str))
        return
    streamed = not (agentic or reasoning)  # else the answer is shown once complete
    if not streamed:
        click.echo(answer or "(no answer: the model ended its turn before answering)")
    click.echo("\n\nSources:" if streamed else "\nSources:")
    for n, source in enumerate(sources, 1):
        mark = "   <- the answer's words are drawn from this one" if n == drawn else ""
        click.echo(f"  [{n}] {source_label(source)}{mark}")


@main.command()
@click.option("--table", required=True, help="LanceDB table to answer from.")
@click.option("--model", default=None, help="Model folder, e.g. runs/demo/merged [default: packaged base model].")
@DB_OPTION
@STORAGE_OPTION
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind; 0.0.0.0 exposes it.")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--api-key", envvar="RAGRPO_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1/ (also from $RAGRPO_API_KEY).")
@click.option("--max-tokens", type=int, default=512, show_default=True, help="Largest max_tokens a request may ask.")
@click.option("--max-waiting", type=int, default=64, show_default=True,
              help="Requests that may wait for the model; more get 503.")
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True,
              help="Default for requests that do not send one. It counts the prompt's tokens too, so above 1 it "
              "taxes copying names out of the passages; requests may send OpenAI's frequency_penalty instead.")
@click.option("--threads", type=int, default=None, help="torch CPU threads [default: torch's, one per core].")
@click.option("--retrieval-deadline", type=float, default=10.0, show_default=True,
              help="Seconds a search may take (embedding included) before the request gets 504.")
@click.option("--max-batch", type=int, default=None,
              help="Requests decoded together in one batch [default: 8 per CPU core, at most 64; 64 on a GPU]. "
              "1 serves one request at a time.")
@click.option("--prefill-chunk", type=int, default=1024, show_default=True,
              help="Prompt tokens prefilled between two decode steps while other requests decode: a long prompt "
              "holds them up one chunk at a time.")
@user_errors
def serve(table, model, db, storage_options, host, port, api_key, max_tokens, max_waiting, repetition_penalty, threads,
          retrieval_deadline, max_batch, prefill_chunk):
    """Serve RAG answers over HTTP: an OpenAI-compatible API (/v1/chat/completions, /v1/models,
    /v1/search, /healthz) and a web page at /.

    Example: ragrpo serve --table movies --model runs/demo/merged --port 8000
    """
    from ragrpo.retrieval.index import parse_storage_options
    from ragrpo.serving.server import serve as run_server

    if max_tokens < 1 or max_waiting < 0:
        raise RagrpoError("--max-tokens must be at least 1 and --max-waiting at least 0")
    if not retrieval_deadline > 0:
        raise RagrpoError(f"--retrieval-deadline must be above 0 seconds, got {retrieval_deadline}")
    run_server(table, model, db=db, host=host, port=port, api_key=api_key, max_tokens=max_tokens,
               max_waiting=max_waiting, repetition_penalty=repetition_penalty, threads=threads, max_batch=max_batch,
               prefill_chunk=prefill_chunk, retrieval_deadline=retrieval_deadline,
               storage_options=parse_storage_options(storage_options),
               echo=lambda line: click.echo(line, err=True))


@main.group("rewards")
def rewards_group():
    """List the built-in rewards, or score a text with any reward to debug it before a long run.

    Example: ragrpo rewards score --reward groundedness --completion "Finch made it up." --context docs.txt
    """


@rewards_group.command("list")
@user_errors
def rewards_list():
    """Print the built-in rewards, one line each: the name (also the metric key) and what it scores.

    Example: ragrpo rewards list
    """
    from ragrpo.rewards.builtin import REWARDS, describe

    width = max(map(len, REWARDS))
    for name, func in REWARDS.items():
        click.echo(f"{name:<{width}}  {describe(func)}")


@rewards_group.command("score")
@click.option("--reward", "specs", multiple=True, required=True,
              help="NAME, package.module:function or file.py:function; repeatable.")
@click.option("--completion", required=True, help="The text to score, as the model would have written it.")
@click.option("--context", "context_file", default=None,
              help="Text file of retrieved passages separated by blank lines (the 'context' column).")
@click.option("--query", default=None, help="The question (the 'query' column).")
@user_errors
def rewards_score(specs, completion, context_file, query):
    """Print each reward's score for one completion, called as training calls it.

    Example: ragrpo rewards score --reward citation --reward groundedness --completion "Finch lied [1]."
    --context docs.txt --query "Who invented the island?"
    """
    from ragrpo.rewards.builtin import read_passages
    from ragrpo.rewards.registry import score_text

    context = read_passages(context_file) if context_file is not None else None
    for name, value in score_text(list(specs), completion, context=context, query=query):
        click.echo(f"{name}: {value if value is None else round(value, 4)}")


@main.command("eval")
@click.argument("model")
@click.option("--base", default=None, help="Model to compare with [default: packaged SmolLM2-135M-Instruct].")
@click.option("--dataset", default=None, help="Prompts [default: the run's, else builtin:movies].")
@click.option("--prompt-template", default=None)
@click.option("--reward", "rewards", multiple=True, help="NAME[=WEIGHT], repeatable [default: the run's].")
@click.option("--samples", type=int, default=2, show_default=True, help="Completions per prompt.")
@click.option("--max-new-tokens", type=int, default=None, help="[default: the run's max_completion_length, else 128]")
@click.option("--max-prompts", type=int, default=None, help="Use at most this many held-out prompts.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
@click.option("--from-index", "from_index", default=None, metavar="TABLE", help="Evaluate a `train --from-index` "
              "run on its held-out documents in TABLE: hit@k, groundedness, citation; writes report.md and PNGs.")
@click.option("--db", default=None, help="LanceDB folder or URI [default: the run's] (with --from-index).")
@STORAGE_OPTION
@click.option("--seeds", default="0,1,2", show_default=True, help="Sampling seeds, comma-separated (with --from-index).")
@click.option("--output", default=None, help="Report folder [default: MODEL/eval-index] (with --from-index).")
@click.option("--qa", default=None, metavar="FILE.jsonl", help="Gold questions (question, answers, optional "
              "source_id) [default: the packaged set of the run's corpus, if any] (with --from-index).")
@click.option("--order", type=click.Choice(["balanced", "retrieved"]), default="balanced", show_default=True,
              help="Passage order: the source at each position equally often, or as retrieved (with --from-index).")
@click.option("--table-version", type=int, default=None, help="Read the table at this LanceDB version "
              "[default: the version the run trained on] (with --from-index).")
@click.option("--agentic", is_flag=True, help="The models search for themselves, as an agentic run trained: "
              "how often their searches find the source, searches per answer, answer accuracy against single-shot "
              "RAG; writes MODEL/eval-agentic (with --from-index).")
@user_errors
def evaluate(model, base, dataset, prompt_template, rewards, samples, max_new_tokens, max_prompts, seed, as_json,
             from_index, db, storage_options, seeds, output, qa, order, table_version, agentic):
    """Score MODEL and its base on held-out prompts: each reward's mean, side by side.

    MODEL is a run folder (its dataset, template, rewards and held-out split are reused) or a model
    folder. Both models see the same prompts with the same sampling seed (temperature 1; with
    --from-index, the run's training temperature).

    Example: ragrpo eval runs/demo --samples 4

    Example: ragrpo eval --from-index movies runs/rag --seeds 0,1,2

    Example: ragrpo eval --from-index movies runs/agentic --agentic --max-prompts 120
    """
    from ragrpo.evaluation.evaluate import compare_run

    if agentic and not from_index:
        raise UserError("--agentic evaluates a `train --from-index --agentic` run: add --from-index TABLE")
    if from_index:
        from ragrpo.evaluation.from_index import compare_from_index
        from ragrpo.retrieval.index import parse_storage_options

        try:
            seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            raise UserError(f"--seeds {seeds!r}: give integers separated by commas, e.g. 0,1,2") from None
        if agentic:
            from ragrpo.evaluation.agentic import compare_agentic

            result = compare_agentic(model, from_index, base=base, db=db, seeds=seed_list,
                                     max_new_tokens=max_new_tokens, max_questions=max_prompts, output=output, qa=qa,
                                     table_version=table_version, storage_options=parse_storage_options(storage_options),
                                     echo=lambda line: click.echo(line, err=True))
            click.echo(json.dumps(result.to_dict()) if as_json else result.table())
            return
        result = compare_from_index(model, from_index, base=base, db=db, seeds=seed_list,
                                    max_new_tokens=max_new_tokens, max_questions=max_prompts, output=output,
                                    qa=qa, order=order, table_version=table_version,
                                    storage_options=parse_storage_options(storage_options),
                                    echo=lambda line: click.echo(line, err=True))
        click.echo(json.dumps(result.to_dict()) if as_json else result.table())
        return

    result = compare_run(model, base, dataset=dataset, prompt_template=prompt_template, rewards=list(rewards),
                         max_new_tokens=max_new_tokens, samples=samples, seed=seed, max_prompts=max_prompts)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    else:
        click.echo(f"{result.prompts} held-out prompts x {result.samples} samples per model\n{result.table()}")


@main.command()
@click.argument("run_dir")
@click.option("--output", default=None, help="PNG path [default: RUN_DIR/curves.png].")
@user_errors
def plot(run_dir, output):
    """Draw a run's training curves (rewards, KL, completion length, step time) to a PNG.

    Example: ragrpo plot runs/demo
    """
    from ragrpo.evaluation.evaluate import plot_run

    click.echo(str(plot_run(run_dir, output)))


@main.command()
@click.option("--workdir", default="runs/quickstart", show_default=True, help="Where the table and the run go.")
@click.option("--max-steps", type=int, default=None, help="GRPO steps [default: QUICKSTART_GRPO in ragrpo.quickstart].")
@click.option("--seed", type=int, default=42, show_default=True,
              help="The training seed (sampling, LoRA init, passage order); runs differ by it.")
@user_errors
def quickstart(workdir, max_steps, seed):
    """The whole pipeline on built-in data: index, GRPO-train, merge, and answer with base and tuned models.

    Example: ragrpo quickstart --workdir runs/quickstart
    """
    from ragrpo.quickstart import report, run

    result = run(workdir, seed=seed, max_steps=max_steps, echo=lambda line: click.echo(line, err=True))
    click.echo(report(result))


@main.command("hardware")
@user_errors
def hardware_command():
    """Print, as JSON, every hardware decision in force (device, bf16, packing, threads) and the CPU's flags.

    Example: RAGRPO_THREADS=1 ragrpo hardware
    """
    from ragrpo import hardware

    click.echo(json.dumps(hardware.summary(), indent=2))


if __name__ == "__main__":
    sys.exit(main())
