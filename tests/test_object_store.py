"""LanceDB on object storage: `--db s3://bucket/path` against a real S3-compatible server (moto's, started
here on 127.0.0.1 with signature checks on), and provenance: a from-index run reads its table at the
version it recorded."""

import json
import re
import uuid

import pytest
from click.testing import CliRunner
from test_cli import assert_user_error, ragrpo

from ragrpo import RagrpoError
from ragrpo.cli import main

pytestmark = pytest.mark.integration

BUCKET = "ragrpo-tests"
REGION = "us-east-1"


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server with one bucket and one IAM user allowed s3:*; requests are authenticated (moto
    accepts anything by default), so a wrong secret is refused as AWS would refuse it."""
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    setup = {"endpoint_url": endpoint, "region_name": REGION, "aws_access_key_id": "setup",
             "aws_secret_access_key": "setup"}
    boto3.client("s3", **setup).create_bucket(Bucket=BUCKET)
    iam = boto3.client("iam", **setup)
    iam.create_user(UserName="ragrpo")
    iam.put_user_policy(UserName="ragrpo", PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="ragrpo")["AccessKey"]
    with pytest.MonkeyPatch.context() as patch:
        # the server runs in this process, so its authentication switch is this module attribute
        patch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
        patch.setattr(ActionAuthenticatorMixin, "request_count", 0)
        yield {"endpoint": endpoint, "key_id": key["AccessKeyId"], "secret": key["SecretAccessKey"],
               "client": boto3.client("s3", endpoint_url=endpoint, region_name=REGION,
                                      aws_access_key_id=key["AccessKeyId"],
                                      aws_secret_access_key=key["SecretAccessKey"])}
    server.stop()


@pytest.fixture()
def s3_db(s3_server, monkeypatch, tmp_path):
    """A fresh `s3://` database URI, with the standard AWS variables pointing at the server; the working
    directory is an empty folder, so that a stray local database would show."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["endpoint"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server["key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server["secret"])
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    monkeypatch.chdir(tmp_path)
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}/lancedb"


@pytest.fixture(scope="module")
def movies_csv(tmp_path_factory):
    """The first 8 built-in movies (one per year from 1920, each of its own genre) as a CSV."""
    from importlib.resources import files

    import pandas as pd

    frame = pd.read_csv(files("ragrpo") / "data" / "movies.csv").head(8)
    path = tmp_path_factory.mktemp("data") / "movies.csv"
    frame.to_csv(path, index=False)
    return path


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def test_index_search_and_upsert_on_s3(s3_db, s3_server, movies_csv, tmp_path):
    import pandas as pd

    from ragrpo.retrieval.index import open_table

    out = cli("index", movies_csv, "--table", "movies", "--db", s3_db, "--id-column", "title")
    assert "indexed 8 documents" in out and "movie_plot_idx" in out
    prefix = s3_db.removeprefix(f"s3://{BUCKET}/")
    stored = s3_server["client"].list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]
    assert any("/movies.lance/_versions/" in o["Key"] for o in stored)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no local folder stood in for the bucket

    def rows(*args):
        return [json.loads(line) for line in cli("search", *args, "--table", "movies", "--db", s3_db,
                                                 "--json").splitlines()]

    assert rows("Murano glassblower chandelier", "--mode", "fts", "-k", "1")[0]["title"] == "The Glassblower's Debt"
    assert rows("Murano glassblower chandelier", "--mode", "hybrid", "-k", "2")[0]["title"] == \
        "The Glassblower's Debt"
    filtered = rows("a story", "--where", "release_year >= 1925", "-k", "8")
    assert sorted(r["release_year"] for r in filtered) == [1925, 1926, 1927]

    # an upsert: one plot rewritten, one film added; the other seven stay as they were
    frame = pd.read_csv(movies_csv).head(1)
    frame.loc[0, "Plot"] = "A Murano glassblower trains a parrot to sing opera for a Venetian countess."
    extra = frame.assign(Title="The Parrot of Murano II", **{"Release Year": 1930})
    upsert = tmp_path.parent / f"{tmp_path.name}-upsert.csv"
    pd.concat([frame, extra]).to_csv(upsert, index=False)
    before = open_table("movies", s3_db).version
    assert "upserted 2 documents" in cli("index", upsert, "--table", "movies", "--db", s3_db, "--id-column", "title")
    table = open_table("movies", s3_db)
    assert table.count_rows() == 9 and table.version > before
    hits = rows("parrot opera countess", "--mode", "fts", "-k", "2")
    assert {h["title"] for h in hits} == {"The Glassblower's Debt", "The Parrot of Murano II"}
    assert all("parrot" in h["movie_plot"] for h in hits)


def test_a_storage_option_overrides_the_environment(s3_db, s3_server, movies_csv, monkeypatch):
    from ragrpo.retrieval.index import index

    index(str(movies_csv), "movies", s3_db)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    refused = ragrpo("search", "glassblower", "--table", "movies", "--db", s3_db)
    assert_user_error(refused, "SignatureDoesNotMatch", "AWS_SECRET_ACCESS_KEY")
    fixed = ragrpo("search", "glassblower", "--table", "movies", "--db", s3_db, "--mode", "fts", "-k", "1",
                   "--storage-option", f"aws_secret_access_key={s3_server['secret']}")
    assert fixed.returncode == 0, fixed.stderr
    assert "The Glassblower's Debt" in fixed.stdout
    bad = ragrpo("search", "glassblower", "--table", "movies", "--db", s3_db, "--storage-option", "no-equals-sign")
    assert_user_error(bad, "--storage-option 'no-equals-sign'", "KEY=VALUE")


COMMANDS = {  # each reaches the table before it loads any language model
    "index": ["index", "builtin:movies", "--table", "movies"],
    "search": ["search", "a detective", "--table", "movies"],
    "ask": ["ask", "Who is the killer?", "--table", "movies"],
    "serve": ["serve", "--table", "movies", "--port", "0"],
    "train": ["train", "--from-index", "movies", "--output", "run"],
}


def test_a_streamed_ingest_that_fails_late_leaves_the_bucket_as_it_was(s3_db, s3_server, movies_csv, tmp_path):
    """A bad row after the first batch: the data files already uploaded are removed, and a table that
    existed keeps its version."""
    import pandas as pd

    from ragrpo.retrieval.index import has_table, open_table

    frame = pd.read_csv(movies_csv)
    bad = frame.assign(**{"Release Year": [*frame["Release Year"][:-1], "later"]})
    bad.to_csv(tmp_path / "bad.csv", index=False)
    prefix = s3_db.removeprefix(f"s3://{BUCKET}/")

    def stored(table):
        listing = s3_server["client"].list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/{table}.lance/")
        return [o["Key"] for o in listing.get("Contents", [])]

    result = ragrpo("index", tmp_path / "bad.csv", "--table", "fresh", "--db", s3_db, "--batch-rows", "3")
    assert_user_error(result, "does not fit its column's type")
    assert not has_table("fresh", s3_db) and stored("fresh") == []

    cli("index", movies_csv, "--table", "movies", "--db", s3_db)
    version = open_table("movies", s3_db).version
    result = ragrpo("index", tmp_path / "bad.csv", "--table", "movies", "--db", s3_db, "--batch-rows", "3",
                    "--overwrite")
    assert_user_error(result, "does not fit its column's type")
    table = open_table("movies", s3_db)
    assert table.version == version and table.count_rows() == 8


@pytest.mark.parametrize("command", COMMANDS)
def test_a_missing_bucket_is_one_error_line(s3_db, command, tmp_path):
    result = ragrpo(*COMMANDS[command], "--db", "s3://no-such-bucket/lancedb", cwd=tmp_path)
    assert_user_error(result, "s3://no-such-bucket/lancedb", "NoSuchBucket")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_a_refused_secret_in_a_storage_option_is_one_error_line(s3_db, command, tmp_path):
    # the variables hold good credentials: only the option, reaching this command's connection, is wrong
    result = ragrpo(*COMMANDS[command], "--db", s3_db, "--storage-option", "aws_secret_access_key=wrong",
                    cwd=tmp_path)
    assert_user_error(result, s3_db, "SignatureDoesNotMatch", "aws_secret_access_key")


def test_an_unknown_access_key_in_the_environment_is_one_error_line(s3_db, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
    assert_user_error(ragrpo(*COMMANDS["index"], "--db", s3_db), s3_db, "InvalidAccessKeyId")


@pytest.mark.parametrize("allow_http,expected", [("true", "cannot reach the endpoint (Connection refused)"),
                                                (None, "set AWS_ALLOW_HTTP=true")])
def test_an_unreachable_or_plain_http_endpoint_says_which_variable_to_fix(s3_db, monkeypatch, allow_http, expected):
    import socket

    from ragrpo.retrieval.index import open_table

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    if allow_http is None:
        monkeypatch.delenv("AWS_ALLOW_HTTP")
    with pytest.raises(RagrpoError, match=re.escape(expected)) as error:
        open_table("movies", s3_db)
    assert "\n" not in str(error.value)


def test_open_table_finds_a_table_past_the_first_ten(tmp_path):
    # LanceDB's table_names() returns 10 names unless asked for more; listing pages through them all
    import lancedb

    from ragrpo.retrieval.index import open_table

    db = lancedb.connect(tmp_path / "db")
    for n in range(12):
        db.create_table(f"t{n:02d}", data=[{"n": n}])
    assert open_table("t11", tmp_path / "db").to_arrow()["n"].to_pylist() == [11]


def test_a_from_index_run_on_s3_records_the_uri_and_version_and_eval_reads_that_version(s3_db, movies_csv,
                                                                                       tmp_path):
    import pandas as pd

    from ragrpo.generation.rag import retrieve
    from ragrpo.retrieval.index import index, open_table
    from ragrpo.tuning.curriculum import (
        IndexSource,
        build_curriculum,
        document_id,
        open_run_table,
        read_curriculum,
    )

    index(str(movies_csv), "movies", s3_db, id_column="title")
    curriculum = build_curriculum(IndexSource("movies", s3_db, k=2, held_out=0.3))
    assert curriculum.examples and curriculum.held_questions
    table = open_table("movies", s3_db)
    record = curriculum.split_record()
    assert record["table_uri"] == f"{s3_db}/movies.lance" and record["table_version"] == table.version
    assert record["source"]["db"] == s3_db
    ids = set(curriculum.train_ids) | set(curriculum.held_ids)
    assert len(ids) == 8 and all(set(e["context_ids"]) <= ids for e in curriculum.examples)

    run = tmp_path / "run"  # the run folder as train_from_index writes it, without the training
    for name, text in curriculum.files().items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(text)
    split, held = read_curriculum(run)
    # after training, a copy of a held-out film under a new title: a question about it now finds both
    query, source_id = held[0].query, held[0].source_id
    frame = pd.read_csv(movies_csv)
    original = frame[[document_id({"movie_plot": p}, "movie_plot") == source_id for p in frame.Plot]]
    assert len(original) == 1
    original.assign(Title="The Sequel Nobody Trained On").to_csv(tmp_path / "copy.csv", index=False)
    index(str(tmp_path / "copy.csv"), "movies", s3_db, id_column="title")
    assert open_table("movies", s3_db).count_rows() == 9

    notices = []
    pinned = open_run_table(split, echo=notices.append)
    assert pinned.version == record["table_version"] and pinned.count_rows() == 8 and notices == []
    titles = [h["title"] for h in retrieve(pinned, query, k=2, mode="hybrid")[0]]
    assert "The Sequel Nobody Trained On" not in titles  # the evaluation retrieves from the trained index
    latest = open_run_table(split, table_version=open_table("movies", s3_db).version)
    assert "The Sequel Nobody Trained On" in [h["title"] for h in retrieve(latest, query, k=2, mode="hybrid")[0]]

    old = {k: v for k, v in split.items() if k not in ("table_uri", "table_version")}  # a run from before
    assert open_run_table(old, echo=notices.append).count_rows() == 9
    assert len(notices) == 1 and "recorded no table version" in notices[0]
    with pytest.raises(RagrpoError, match="no version 999"):
        open_run_table(split, table_version=999)

    (run / "merged").mkdir()  # eval checks the table before it loads the model
    result = ragrpo("eval", "--from-index", "movies", run, "--table-version", "999")
    assert_user_error(result, "no version 999", "--table-version")
