#!/usr/bin/env bash
# vs.sh SEED THREADS NAME REWARDS : train then evaluate (3 seeds), from the snapshot source
set -u
SEED=$1; TH=$2; NAME=$3; REW=$4
RUN=/work/runs/$NAME; OUT=/work/runs/eval/$NAME
export PYTHONPATH=/work/snap/src RAGRPO_THREADS=$TH OMP_NUM_THREADS=$TH
PY=/work/main/.venv/bin/python
$PY /work/scratch/s28/seed_vs.py /work/runs/moviesdb $RUN $SEED "$REW" > /work/runs/$NAME.train.log 2>&1
mkdir -p $OUT/answers && cp /work/main/bench/results/from-index/r29/s42/answers/base-seed*.json $OUT/answers/
/work/main/.venv/bin/ragrpo eval --from-index movies $RUN --db /work/runs/moviesdb --seeds 0,1,2 --output $OUT > /work/runs/$NAME.eval.log 2>&1
echo done > /work/runs/$NAME.done
