#!/usr/bin/env bash
# vs.sh SEED THREADS NAME REWARDS : train then evaluate (3 seeds), from a snapshot of src (SNAP; env KINDS, NOT_FIRST,
# NOT_FIRST_QUESTIONS pass through to seed_vs.py). r34: NOT_FIRST=who,blank ./vs.sh 42 2 r34-s42 -nothing;
# r35: NOT_FIRST_QUESTIONS=100 ...; r36: NOT_FIRST_QUESTIONS=50 ... (session 29). The base answers are copied from
# r30's evaluation on the same CPU (AMD EPYC, avx512_bf16 without AMX): prompts differ between CPU kinds.
set -u
SEED=$1; TH=$2; NAME=$3; REW=$4
RUN=/work/runs/$NAME; OUT=/work/runs/eval/$NAME
export PYTHONPATH=${SNAP:-/work/snap29}/src RAGRPO_THREADS=$TH OMP_NUM_THREADS=$TH
PY=/work/main/.venv/bin/python
$PY "$(dirname "$0")/seed_vs.py" /work/runs/moviesdb $RUN $SEED "$REW" > /work/runs/$NAME.train.log 2>&1
mkdir -p $OUT/answers && cp /work/main/bench/results/from-index/r30/s42/answers/base-seed*.json $OUT/answers/
/work/main/.venv/bin/python -m ragrpo.cli eval --from-index movies $RUN --db /work/runs/moviesdb --seeds 0,1,2 --output $OUT > /work/runs/$NAME.eval.log 2>&1
echo done > /work/runs/$NAME.done
