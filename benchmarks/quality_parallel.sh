#!/usr/bin/env bash
# Fill one quality table (benchmarks/quality.py) with several processes sharing one GPU: the student step is too
# small to keep a GPU busy, so one process per student (or per row) goes several times faster than one process.
#
#   bash benchmarks/quality_parallel.sh DATASET [quality.py options: --teacher, --minilm, --out, --device ...]
#
# Environment: STUDENTS and METHODS (the rows; default every student, and every method but embeddistill-dev),
# PER=student|row (one process per student, or per student and method), WORK (default runs/quality/DATASET),
# PYTHON (default python3).
# A first single process makes the teacher's embeddings (the teacher and BM25 rows), so that the others find them
# in the teacher cache; then the student processes run together and add their rows to the table under its lock.
set -euo pipefail
dataset=$1
shift
students=${STUDENTS:-mpnet-2L-asym minilm-asym minilm-2L-asym minilm-sym}
methods=${METHODS:-embeddistill score-only peer untrained}
work=${WORK:-runs/quality/$dataset}
python=${PYTHON:-python3}
here=$(dirname "$0")
mkdir -p "$work/logs"

first_student=${students%% *}
"$python" "$here/quality.py" --dataset "$dataset" --students "$first_student" --methods teacher bm25 \
    --work-dir "$work/prepare" "$@" >"$work/logs/prepare.log" 2>&1
touch "$work/prepared"

pids=()
for student in $students; do
    if [ "${PER:-student}" = row ]; then
        for method in $methods; do
            "$python" "$here/quality.py" --dataset "$dataset" --students "$student" --methods $method \
                --work-dir "$work/$student/$method" "$@" >"$work/logs/$student.$method.log" 2>&1 &
            pids+=($!)
        done
    else
        # shellcheck disable=SC2086 # $methods is a list
        "$python" "$here/quality.py" --dataset "$dataset" --students "$student" --methods $methods \
            --work-dir "$work/$student" "$@" >"$work/logs/$student.log" 2>&1 &
        pids+=($!)
    fi
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
