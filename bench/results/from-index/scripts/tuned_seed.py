# Generate the tuned model's held-out answers for one seed into the eval cache (run in parallel per seed).
import sys
import time
from pathlib import Path

from ragrpo.curriculum import IndexSource, rag_examples, read_curriculum
from ragrpo.index import open_table
from ragrpo.index_eval import cached_answers

run = "/tmp/wt5/runs/final"
split, questions = read_curriculum(run)
source = split["source"]
rows = rag_examples(open_table(source["table"], source["db"]), questions[:48], split["text_column"], IndexSource(**source))
seed = int(sys.argv[1])
t = time.time()
cached_answers(Path("/tmp/wt5/eval-final"), "tuned", run + "/merged", rows, seed=seed, max_new_tokens=40, loaded={})
print("seed", seed, time.time() - t, flush=True)
