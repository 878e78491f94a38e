"""The quickstart's training (default from-index recipe, 200 steps, held out 0.2) with rewards added or removed: how r28 and r29 ran.

    python seed_vs.py DB RUN SEED -answer_match=2,answer_match_own_words=2,answer_match=0,verbatim_span=0
    KINDS=all NOT_FIRST=keyword,when python seed_vs.py DB RUN SEED -nothing
    NOT_FIRST_QUESTIONS=50 python seed_vs.py DB RUN SEED -nothing

r28-r30 ran the first form, r31 `-nothing` (the default as it was), r32 the second (session 28), r35 and r36 the
third with 100 and 50 (session 29). `vs.sh` beside
it trains and then evaluates with 3 seeds, with the base model's answers copied in from an earlier evaluation.
"""
import os
import sys
import time

from ragrpo.config import build_run_config
from ragrpo.models import quiet_transformers
from ragrpo.quickstart import HELD_OUT, QUICKSTART_GRPO
from ragrpo.tuning.curriculum import IndexSource, from_index_config, train_from_index
from ragrpo.tuning.questions import parse_kinds

quiet_transformers()
db, out, seed, extra = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(",")
late = {"not_first": parse_kinds(os.environ["NOT_FIRST"])} if os.environ.get("NOT_FIRST") else {}
if os.environ.get("NOT_FIRST_QUESTIONS"):
    late["not_first_questions"] = int(os.environ["NOT_FIRST_QUESTIONS"])
source = IndexSource("movies", db, held_out=HELD_OUT, order_seed=seed, kinds=parse_kinds(os.environ.get("KINDS")), **late)
cfg = from_index_config(build_run_config(output=out, seed=seed, held_out=HELD_OUT, **QUICKSTART_GRPO), source,
                        rewards_given=False)
drop = {e[1:] for e in extra if e.startswith('-')}
cfg.rewards = [r for r in cfg.rewards if r not in drop] + [e for e in extra if not e.startswith('-')]
print("rewards", cfg.rewards, "grpo", cfg.grpo, "kinds", source.kinds, "not first", source.not_first, source.not_first_questions, flush=True)
t = time.perf_counter()
result, curriculum = train_from_index(cfg, source, overwrite=True)
print("questions", curriculum.train_questions, "trained in", round((time.perf_counter() - t) / 60, 1), "min ->", result.merged, flush=True)
