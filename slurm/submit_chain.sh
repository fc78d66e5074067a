#!/bin/bash
# Submit a chain of N dependent training jobs, for runs longer than the partition's time limit.
#
#   slurm/submit_chain.sh N [SBATCH OPTIONS ...] -- CONFIG [KEY=VALUE ...]
#   slurm/submit_chain.sh 5 -p gpu -N 2 --ntasks-per-node=8 --gpus-per-node=8 -t 24:00:00 -- configs/run.yaml
#
# Each job is slurm/train.sbatch with REQUEUE=0: at its time-limit warning it saves a checkpoint and
# ends COMPLETED; the next job (afterok) resumes from that checkpoint. Jobs that find the run
# finished (done.json) exit at once. A job that fails cancels the rest (--kill-on-invalid-dep).
# Prints the job ids, one per line, first to last.
set -euo pipefail

N=${1:?usage: submit_chain.sh N [SBATCH OPTIONS ...] -- CONFIG [KEY=VALUE ...]}
shift
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "submit_chain.sh: N must be a positive number of jobs, got '$N'" >&2; exit 2; }
options=()
while (($#)) && [[ $1 != -- ]]; do options+=("$1"); shift; done
[[ ${1:-} == -- ]] || { echo "submit_chain.sh: put -- between the sbatch options and CONFIG" >&2; exit 2; }
shift
(($#)) || { echo "submit_chain.sh: CONFIG missing after --" >&2; exit 2; }
TEMPLATE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/train.sbatch
previous=""
for ((i = 1; i <= N; i++)); do
    dependency=()
    [[ -n $previous ]] && dependency=(--dependency="afterok:$previous" --kill-on-invalid-dep=yes)
    previous=$(REQUEUE=0 sbatch --parsable --export=ALL,REQUEUE=0 "${dependency[@]}" "${options[@]}" "$TEMPLATE" "$@")
    previous=${previous%%;*}
    echo "$previous"
done
