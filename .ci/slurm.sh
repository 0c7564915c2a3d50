#!/usr/bin/env bash
# The Slurm profile on a real Slurm: installs and starts a single-node Slurm with accounting on this machine
# (.ci/slurm-cluster.sh), then
#   1. runs configs/ci.yaml through profiles/slurm, checks that sacct lists every job the run submitted, and that
#      the tables and evaluation summaries are byte-identical to the local run's (results/ci, `make ci-workflow`);
#   2. runs one more training job (.ci/slurm-resume.yaml), requeues it (scontrol requeue) and cancels it
#      (scancel) mid-run, and checks that it resumed from its checkpoint each time and that the run finished.
# The profile is used as it is; the only addition is a first status check after 5 s instead of 20 s, which
# shortens the test (it is a command-line flag, so it merges with the profile).
# First it installs the plugin into .venv and runs tests/test_slurm_profile.py (the profile's sbatch arguments,
# against a fake sbatch). Where the cluster cannot be set up (not root, no apt-get, a Slurm configuration of the
# machine's own, apt-get failing) it then prints why and exits 0. DRPO_CI_SLURM=0 skips it all. On any exit the
# trap interrupts Snakemake, cancels every job and stops every daemon by its recorded PID.
# Logs: results/ci-slurm-logs/; the daemons': /var/tmp/drpo-slurm/logs/.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
CLUSTER=.ci/slurm-cluster.sh
LOGS=results/ci-slurm-logs
SNAKEMAKE=(.venv/bin/snakemake --workflow-profile profiles/slurm --slurm-init-seconds-before-status-checks 5)
RUN_DIR=results/ci-slurm/runs/drpo/seed1
DAEMON_NAMES=(munged mariadbd slurmdbd slurmctld slurmd slurmstepd)

say() { echo "[slurm-ci $(( $(date +%s) - started ))s] $*"; }
fail() { say "FAILED: $*" >&2; exit 1; }

if [ "${DRPO_CI_SLURM:-1}" = 0 ]; then say "SKIPPED: DRPO_CI_SLURM=0"; exit 0; fi
# The plugin, and the sbatch arguments it builds from the profile (against a fake sbatch: no cluster needed).
make -s setup-slurm
.venv/bin/python -m pytest -q -p no:cacheprovider tests/test_slurm_profile.py
if ! reason=$($CLUSTER check); then say "SKIPPED the real Slurm: cannot run one here: $reason"; exit 0; fi
if ! $CLUSTER install; then
    say "SKIPPED the real Slurm: its packages could not be installed (apt-get failed, above)"; exit 0
fi
say "packages and plugin ready"

# Processes of these names that were there before: the end checks that nothing else is left.
daemon_pids() { local name; for name in "${DAEMON_NAMES[@]}"; do pgrep -x "$name" || true; done | sort; }
before=$(daemon_pids)
watcher=""
snakemake_pid=""
# Snakemake under `timeout -s INT -k 30`: a run that hangs is interrupted, cancels its jobs and exits. It runs in
# the background so that a signal to this script is handled at once (bash runs traps only between commands).
run_snakemake() {  # log seconds snakemake-arguments...
    local log=$1 seconds=$2 rc=0; shift 2
    timeout -s INT -k 30 "$seconds" "${SNAKEMAKE[@]}" "$@" > "$log" 2>&1 &
    snakemake_pid=$!
    wait "$snakemake_pid" || rc=$?
    snakemake_pid=""
    return $rc
}
cleanup() {
    local rc=$? i
    trap - EXIT INT TERM
    if [ -n "$watcher" ] && kill -0 "$watcher" 2>/dev/null; then kill "$watcher" 2>/dev/null || true; fi
    if [ -n "$snakemake_pid" ] && kill -0 "$snakemake_pid" 2>/dev/null; then
        say "interrupting Snakemake, which cancels its jobs"
        kill -INT "$snakemake_pid" 2>/dev/null || true   # timeout passes it on, and kills 30 s later
        for i in $(seq 1 250); do kill -0 "$snakemake_pid" 2>/dev/null || break; sleep 0.2; done
    fi
    $CLUSTER down || rc=1
    local left
    left=$(comm -13 <(echo "$before") <(daemon_pids))
    if [ -n "$left" ]; then
        say "FAILED: processes left behind:"; ps -o pid,comm,args -p "$(echo $left | tr ' ' ',')" || true; rc=1
    fi
    say "$([ $rc = 0 ] && echo passed || echo "failed (exit $rc)") in $(( $(date +%s) - started )) s"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

rm -rf "$LOGS" results/ci-slurm
mkdir -p "$LOGS"
$CLUSTER up
up_time=$(date +%Y-%m-%dT%H:%M:%S)

# --- 1. configs/ci.yaml through the profile, compared with the local run ------------------------------------
# The local run to compare with: .ci/run and `make ci-slurm` have just made it; made here only when missing.
if [ ! -f results/ci/tables/summary.csv ]; then
    make -s ci-workflow > "$LOGS/local.log" 2>&1 \
        || { tail -n 30 "$LOGS/local.log"; fail "the local run of configs/ci.yaml"; }
fi
say "comparing with the local run of configs/ci.yaml in results/ci"
t0=$(date +%s)
rc=0
run_snakemake "$LOGS/ci.log" 900 --configfile configs/ci.yaml .ci/slurm-ci.yaml || rc=$?
[ "$rc" = 0 ] || { tail -n 40 "$LOGS/ci.log"; fail "configs/ci.yaml on Slurm (exit $rc, log $LOGS/ci.log)"; }
say "configs/ci.yaml on Slurm finished in $(( $(date +%s) - t0 )) s"

# Every job of the run but the local ones, by rule, from Snakemake's job table ("rule count" lines).
expected=$(awk '/^Job stats:/ {on=1; next} on && /^total/ {exit} on && NF == 2 && $2 ~ /^[0-9]+$/ {print $1, $2}' \
    "$LOGS/ci.log" | grep -Ev '^(all|cost_measured) ' | sort)
sacct -X -n -P -o JobID,Comment,Partition,State,Elapsed,AllocCPUS,ReqMem -S "$up_time" > "$LOGS/sacct-ci.txt"
submitted=$(awk -F'|' '$4 == "COMPLETED" {sub(/^rule_/, "", $2); sub(/_wildcards_.*/, "", $2); print $2}' \
    "$LOGS/sacct-ci.txt" | sort | uniq -c | awk '{print $2, $1}' | sort)
[ -n "$expected" ] && [ "$expected" = "$submitted" ] \
    || fail "sacct's completed jobs by rule differ from the run's: expected [$expected] got [$submitted]"
grep -q "^rule_cost_measured" <(cut -d'|' -f2 "$LOGS/sacct-ci.txt") && fail "cost_measured was submitted (it is local)"
awk -F'|' '$3 != "cpu" {bad=1} END {exit bad}' "$LOGS/sacct-ci.txt" \
    || fail "a job of the device: cpu run left the cpu partition: $(cut -d'|' -f2,3 "$LOGS/sacct-ci.txt" | tr '\n' ' ')"
say "sacct lists the $(wc -l < "$LOGS/sacct-ci.txt") submitted jobs, all COMPLETED in partition cpu: $(echo $expected)"

for table in summary steps; do
    cmp "results/ci/tables/$table.csv" "results/ci-slurm/tables/$table.csv" \
        || fail "tables/$table.csv differs from the local run's"
done
summaries=0
while read -r summary; do
    cmp "$summary" "results/ci-slurm/${summary#results/ci/}" || fail "$summary differs from the Slurm run's"
    summaries=$((summaries + 1))
done < <(find results/ci/eval -name summary.json | sort)
[ "$summaries" -gt 0 ] && [ "$summaries" = "$(find results/ci-slurm/eval -name summary.json | wc -l)" ] \
    || fail "the runs evaluated different checkpoints"
say "tables/summary.csv, tables/steps.csv and $summaries evaluation summaries byte-identical to the local run's"

# Peak memory of every job (sacct MaxRSS, sampled each second): the batch step holds the jobstep Snakemake, step 0
# the rule's Snakemake and its script, side by side; the job needs about their sum.
sacct -n -P -o JobID,Comment,MaxRSS -S "$up_time" > "$LOGS/sacct-memory.txt"
awk -F'|' 'function mb(v) {n = v + 0; if (v ~ /K$/) return n / 1024; if (v ~ /M$/) return n;
                           if (v ~ /G$/) return n * 1024; return n / 1048576}
    $1 !~ /\./ {name[$1] = $2; next}
    {split($1, id, "."); total[id[1]] += mb($3)}
    END {for (j in total) printf "  %-45s %6.0f MB\n", name[j], total[j]}' "$LOGS/sacct-memory.txt" \
    | sort > "$LOGS/memory.txt"
say "peak memory per job (batch + step 0, sacct MaxRSS):"; cat "$LOGS/memory.txt"

# --- 2. requeue and cancel a training job mid-run ------------------------------------------------------------
train_job() {  # "<jobid> <state>" of the training job in Slurm, if any
    squeue -h -t all -o '%i %T %k' \
        | awk '$3 ~ /^rule_train_/ && $2 !~ /^(COMPLETED|CANCELLED|FAILED|TIMEOUT)$/ {print $1, $2}' | tail -1
}
checkpoints() { find "$RUN_DIR/checkpoints" -name training_state.json 2>/dev/null | wc -l; }
wait_until() {  # seconds description command...: poll every 0.2 s
    local seconds=$1 what=$2 i; shift 2
    for i in $(seq 1 $((seconds * 5))); do "$@" && return 0; sleep 0.2; done
    echo "gave up after $seconds s waiting for $what"; return 1
}
resumed_at() { sed -n 's/.*resuming from .* (update \([0-9]*\) of .*/\1/p' "$RUN_DIR/train.log" 2>/dev/null | head -1; }
running_with_checkpoint() { set -- $(train_job); [ "${2:-}" = RUNNING ] && [ "$(checkpoints)" -ge 1 ]; }
resumed_in() { [ "$(train_job | cut -d' ' -f1)" = "$1" ] && [ -n "$(resumed_at)" ]; }
# A job other than $1 runs and its log resumes past update $2 (the cancelled job's log resumed at $2).
resumed_past() { set -- "$1" "$2" $(train_job); [ -n "${3:-}" ] && [ "$3" != "$1" ] && [ "${4:-}" = RUNNING ] \
    && [ "$(resumed_at)" -gt "$2" ] 2>/dev/null; }
progressed() { [ "$(checkpoints)" -gt "$1" ]; }

interrupt() {  # runs beside Snakemake; writes what it did to $LOGS/interrupt.log
    local job count step
    wait_until 300 "the training job to run and write a checkpoint" running_with_checkpoint || return 1
    job=$(train_job | cut -d' ' -f1)
    echo "job $job running with $(checkpoints) checkpoint(s): scontrol requeue $job"
    scontrol requeue "$job"
    wait_until 300 "job $job to run again and resume" resumed_in "$job" || return 1
    step=$(resumed_at)
    cp "$RUN_DIR/train.log" "$LOGS/train-after-requeue.log"
    echo "job $job requeued, runs again and says: $(grep -m1 'resuming from' "$RUN_DIR/train.log")"
    count=$(checkpoints)
    wait_until 120 "a new checkpoint after the requeue" progressed "$count" || return 1
    echo "job $job at $(checkpoints) checkpoints: scancel $job"
    scancel "$job"
    wait_until 420 "Snakemake to resubmit the cancelled job and the new job to resume" resumed_past "$job" "$step" \
        || return 1
    cp "$RUN_DIR/train.log" "$LOGS/train-after-cancel.log"
    echo "job $(train_job | cut -d' ' -f1) submitted after the cancel says:" \
        "$(grep -m1 'resuming from' "$RUN_DIR/train.log")"
}
( interrupt > "$LOGS/interrupt.log" 2>&1; echo $? > "$LOGS/interrupt.rc" ) &
watcher=$!
t0=$(date +%s)
rc=0
run_snakemake "$LOGS/resume.log" 900 "$RUN_DIR/train_done.json" \
    --configfile configs/ci.yaml .ci/slurm-ci.yaml .ci/slurm-resume.yaml || rc=$?
for i in $(seq 1 50); do kill -0 "$watcher" 2>/dev/null || break; sleep 0.2; done
kill "$watcher" 2>/dev/null || true
wait "$watcher" 2>/dev/null || true
watcher=""
sed 's/^/  /' "$LOGS/interrupt.log"
[ "$(cat "$LOGS/interrupt.rc" 2>/dev/null)" = 0 ] || fail "requeue/cancel steps (above; $LOGS/resume.log)"
[ "$rc" = 0 ] || { tail -n 40 "$LOGS/resume.log"; fail "the interrupted training run (exit $rc)"; }
[ -f "$RUN_DIR/train_done.json" ] || fail "no $RUN_DIR/train_done.json"
grep -q "resuming from" "$RUN_DIR/train.log" || fail "the final train.log does not say it resumed"
sacct -D -X -n -P -o JobID,Comment,State,Start,End -S "$up_time" > "$LOGS/sacct-resume.txt"
grep "rule_train" "$LOGS/sacct-resume.txt" | sed 's/^/  /'
grep -q "|REQUEUED|" "$LOGS/sacct-resume.txt" || fail "sacct shows no REQUEUED training job"
grep -q "|CANCELLED" "$LOGS/sacct-resume.txt" || fail "sacct shows no CANCELLED training job"
say "requeued and cancelled training resumed from its checkpoints and finished in $(( $(date +%s) - t0 )) s"
