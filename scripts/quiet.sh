#!/usr/bin/env bash
# Runs "$@" while other CPU-heavy processes of this machine (compilers, cargo, test
# binaries, Python, other dsv2 or llama.cpp runs) are kept stopped: a watcher SIGSTOPs
# them every 0.3 s, and every process it stopped is SIGCONTed when the command ends.
# Processes descending from this script are left alone. QUIET_CWD=DIR also stops every
# process whose working directory is under DIR (e.g. another worktree's shells).
# A benchmark on a shared development machine: scripts/quiet.sh dsv2 bench ...
self=$$
list=/tmp/quiet.$$.stopped
: > "$list"
watch() {
  while true; do
    ps -eo pid=,ppid=,comm= > /tmp/quiet.$$.ps
    awk -v self="$self" -v me="$BASHPID" '
      { pid[$1]=$1; ppid[$1]=$2; comm[$1]=$3 }
      END {
        for (p in pid) {
          # skip our own tree
          q=p; mine=0
          for (i=0; i<64 && q>1; i++) { if (q==self || q==me) { mine=1; break } q=ppid[q] }
          if (mine) continue
          c=comm[p]
          if (c ~ /^(rustc|cargo|clippy-driver|cc1|cc1plus|ld|collect2|ninja|make|python|python3|nvrtc.*|test-.*|dsv2|llama-.*|build-script-b.*|kernels-.*|dsv2_.*)$/) print p
        }
      }' /tmp/quiet.$$.ps | while read -r p; do kill -STOP "$p" 2>/dev/null && echo "$p" >> "$list"; done
    if [ -n "${QUIET_CWD:-}" ]; then
      for d in /proc/[0-9]*; do
        p=${d#/proc/}
        case "$(readlink "$d/cwd" 2>/dev/null)" in
          "$QUIET_CWD"*) grep -qx "$p" "$list" || { kill -STOP "$p" 2>/dev/null && echo "$p" >> "$list"; } ;;
        esac
      done
    fi
    sleep 0.3
  done
}
watch &
watcher=$!
cleanup() {
  kill "$watcher" 2>/dev/null; wait "$watcher" 2>/dev/null
  sort -u "$list" | while read -r p; do kill -CONT "$p" 2>/dev/null; done
  echo "quiet: paused $(sort -u "$list" | wc -l) processes" >&2
  rm -f "$list" /tmp/quiet.$$.ps
}
trap cleanup EXIT
sleep 1
"$@"
