# Pre-generate the base model's held-out answers (cached_answers) while the tuned run trains.
import time
from pathlib import Path

from ragrpo.curriculum import IndexSource, rag_examples, read_curriculum
from ragrpo.index import open_table
from ragrpo.index_eval import cached_answers

split, questions = read_curriculum("/tmp/wt5/runs/final")
source = split["source"]
rows = rag_examples(open_table(source["table"], source["db"]), questions[:48], split["text_column"], IndexSource(**source))
loaded = {}
for seed in (0, 1, 2):
    t = time.time()
    cached_answers(Path("/tmp/wt5/eval-final"), "base", None, rows, seed=seed, max_new_tokens=40, loaded=loaded)
    print("seed", seed, time.time() - t, flush=True)
