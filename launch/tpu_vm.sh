#!/usr/bin/env bash
# Runs flaxattn on a Cloud TPU VM slice: create it (queued resource), install flaxattn on every
# worker, run the same `flaxattn.main` command on all workers (their output streamed here), delete.
#
#   launch/tpu_vm.sh [--dry-run] --name=NAME --zone=ZONE --project=PROJECT \
#       [--accelerator=v5litepod-16] [--runtime=v2-alpha-tpuv5-lite] [--spot] \
#       STEP -- FLAXATTN_MAIN_FLAGS
#
# STEP: create | install | run | delete | all (create, install, run, then delete even if run failed).
# FLAXATTN_MAIN_FLAGS go to `python -m flaxattn.main --distributed` on every worker; --workdir must
# be a directory every worker can write (a shared filesystem mount). --dry-run prints each gcloud
# command instead of running it.
set -euo pipefail

dry_run=0 name="" zone="" project="" accelerator="v5litepod-16" runtime="v2-alpha-tpuv5-lite" spot=""
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
step=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --accelerator=*) accelerator="${1#*=}" ;;
    --runtime=*) runtime="${1#*=}" ;;
    --spot) spot="--spot" ;;
    create|install|run|delete|all) step="$1" ;;
    --) shift; break ;;
    *) echo "tpu_vm.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
  shift
done
main_flags=("$@")
for required in name zone project step; do
  if [[ -z "${!required}" ]]; then
    echo "tpu_vm.sh: --${required/step/STEP (create|install|run|delete|all)} is required" >&2
    exit 2
  fi
done

# Prints the command (dry run) or runs it; shell-quoted so the printed line can be pasted.
invoke() {
  if [[ $dry_run == 1 ]]; then
    printf '%q ' "$@" | sed 's/ $//'; echo
  else
    "$@"
  fi
}

location=(--zone="$zone" --project="$project")
on_all_workers=(gcloud compute tpus tpu-vm ssh "$name" "${location[@]}" --worker=all)

create() {
  invoke gcloud compute tpus queued-resources create "$name" --node-id="$name" "${location[@]}" \
    --accelerator-type="$accelerator" --runtime-version="$runtime" ${spot:+"$spot"}
  # Queued resources wait for capacity: poll until the slice is ACTIVE.
  local state=""
  until [[ $dry_run == 1 || $state == ACTIVE ]]; do
    sleep 30
    state=$(gcloud compute tpus queued-resources describe "$name" "${location[@]}" \
      --format='value(state.state)')
    echo "queued resource $name: $state"
    [[ $state == FAILED || $state == SUSPENDED ]] && { echo "tpu_vm.sh: $state" >&2; return 1; }
  done
  if [[ $dry_run == 1 ]]; then
    invoke gcloud compute tpus queued-resources describe "$name" "${location[@]}" \
      --format='value(state.state)'
  fi
}

install() {
  invoke gcloud compute tpus tpu-vm scp --recurse "$repo" "$name:~/flaxattn" "${location[@]}" \
    --worker=all
  invoke "${on_all_workers[@]}" \
    --command="pip install -U 'jax[tpu]' && pip install -e ~/flaxattn"
}

run() {
  local command="cd ~/flaxattn && python -m flaxattn.main --distributed"
  local flag
  for flag in "${main_flags[@]}"; do command+=" $(printf '%q' "$flag")"; done
  invoke "${on_all_workers[@]}" --command="$command"
}

delete() {
  invoke gcloud compute tpus queued-resources delete "$name" "${location[@]}" --force --quiet
}

case "$step" in
  all)
    create
    trap delete EXIT  # The slice costs money: delete it however install or run end.
    install
    run
    ;;
  *) "$step" ;;
esac
