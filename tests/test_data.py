import json
import re

import pytest

from ragrpo import RagrpoError
from ragrpo.data import read_records, require_columns

WIKI_COLUMNS = ["Release Year", "Title", "Origin/Ethnicity", "Director", "Cast", "Genre", "Wiki Page", "Plot"]


def test_builtin_corpus_shape():
    frame = read_records("builtin:movies")
    assert list(frame.columns) == WIKI_COLUMNS
    assert len(frame) >= 150 and frame["Title"].is_unique
    assert frame["Release Year"].min() >= 1920 and frame["Release Year"].max() <= 2024
    assert frame["Release Year"].max() - frame["Release Year"].min() >= 90
    assert (frame["Release Year"] < 1990).sum() >= 40 and (frame["Release Year"] >= 1990).sum() >= 40
    assert frame["Genre"].nunique() >= 10 and frame["Origin/Ethnicity"].nunique() >= 10


def test_builtin_corpus_synopses_are_3_to_8_sentences():
    for plot in read_records("builtin:movies")["Plot"]:
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", plot.strip()) if s]
        assert 3 <= len(sentences) <= 8, plot


# Synopses written so that the character we follow turns out to be the culprit.
TWIST_TITLES = [
    "The Ferryman's Ledger", "The Painter's Alibi", "Rain on Lexington Avenue", "The Honest Count",
    "The Sheriff of Coldwater", "The Cartographer's Lie", "Starfall Colony", "Dingo Creek Tapes",
    "The Glass Orchard", "Paper Moth", "The Beekeeper's Confession", "Saboteur of Ceres Station",
    "Monsoon Witness", "Memoir of a Courier", "Gidgee Station", "The Fourth Quarter Confession",
]
TWIST_WORDS = r"all along|admits|himself|herself|her own|his own|confess|was the|were the|was a fraud|fraud"


def test_builtin_corpus_has_protagonist_villain_twists():
    frame = read_records("builtin:movies").set_index("Title")
    for title in TWIST_TITLES:
        assert re.search(TWIST_WORDS, frame.loc[title, "Plot"].lower()), title
    assert (frame.loc[TWIST_TITLES, "Release Year"] < 1990).sum() >= 5  # the write-up's filter keeps several


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_reads_each_format(tmp_path, suffix):
    frame = read_records("builtin:movies").head(3)
    path = tmp_path / f"docs{suffix}"
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in frame.to_dict("records")))
    else:
        frame.to_parquet(path)
    back = read_records(str(path))
    assert back["Title"].tolist() == frame["Title"].tolist()


def test_bad_inputs(tmp_path):
    with pytest.raises(RagrpoError, match="does not exist"):
        read_records(str(tmp_path / "missing.csv"))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(RagrpoError, match="is empty"):
        read_records(str(tmp_path / "empty.csv"))
    (tmp_path / "header.csv").write_text("a,b\n")
    with pytest.raises(RagrpoError, match="has no rows"):
        read_records(str(tmp_path / "header.csv"))
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(RagrpoError, match="cannot be read as jsonl"):
        read_records(str(tmp_path / "broken.jsonl"))
    with pytest.raises(RagrpoError, match="no column 'Budget'"):
        require_columns(read_records("builtin:movies"), ["Budget"], "builtin:movies")


def test_hub_dataset_names_load_their_split(monkeypatch):
    """A name that is not a local path goes to `datasets.load_dataset` (the hub, or its cache), `name:split`
    choosing the split; nothing is fetched here: the loader is replaced by one that records its call."""
    import datasets

    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        if name == "nobody/missing":
            raise ConnectionError("Couldn't reach 'nobody/missing' on the Hub (LocalEntryNotFoundError)\nmore")
        rows = {"Title": ["A", "B"], "Plot": ["a plot", "b plot"]} if split == "test" else {"Title": [], "Plot": []}
        return datasets.Dataset.from_dict(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    frame = read_records("someone/plots:test")
    assert list(frame["Title"]) == ["A", "B"] and calls[-1] == ("someone/plots", "test")
    with pytest.raises(RagrpoError, match="has no rows"):
        read_records("someone/plots")  # the train split by default, empty here
    assert calls[-1] == ("someone/plots", "train")
    with pytest.raises(RagrpoError, match="neither a local file nor a loadable Hugging Face dataset") as error:
        read_records("nobody/missing")
    assert "\n" not in str(error.value) and "Couldn't reach" in str(error.value)
