# Sourced by the batch scripts: pass SLURM's warning (USR1) and stop (TERM) from the batch shell on to the
# step it started (the launcher, or srun), and return the step's own exit status.
#
#   source launch/slurm/signals.sh
#   the_step & STEP_PID=$!
#   wait_for_step; STATUS=$?
#
# No signal may be lost or kill the step, whenever it comes. The trap only keeps it; the main loop passes
# each kept signal on once the step catches it. So one that comes before `$!` is known, or in a Python
# launcher's first tenths of a second (before it handles SIGUSR1, whose default action would end it with
# status 138, which is not requeued), waits until the step can take it. The loop looks every second (every
# 0.2 s while a signal waits), in a plain `sleep`, after which bash runs any trap that came meanwhile: there is
# no moment where a signal arrives and the shell then blocks without passing it on. A step can still drop a
# signal it takes before it can pass it on (srun before its tasks exist), so the signals passed on are sent
# again every RESEND_S seconds until the step ends; a repeat changes nothing downstream (these scripts keep
# each signal once, the launcher forwards each once, the trainers set a flag).

STEP_PID=
KEPT_SIGNALS=()  # appended to by the trap only, each signal once
FORWARDED=0      # how many of them the main loop has passed on
RESEND_S=${RESEND_S:-5}

on_signal() {
  case " ${KEPT_SIGNALS[*]} " in *" $1 "*) return ;; esac  # a repeat
  echo "received SIG$1: the trainers checkpoint and stop"
  KEPT_SIGNALS+=("$1")
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

# catches PID SIGNAL: whether PID handles or blocks SIGNAL (so that it would not die of it); the same test as
# `takes` in launch/slurm/accelerate_launch.py, which the launcher applies to its trainers.
catches() {
  local num key mask
  num=$(kill -l "$2")
  while read -r key mask; do
    case $key in SigBlk: | SigCgt:) (((0x$mask >> (num - 1)) & 1)) && return 0 ;; esac
  done 2>/dev/null < "/proc/$1/status"
  return 1
}

running() {  # running PID: the process exists and has not exited (a zombie has)
  local stat
  read -r stat 2>/dev/null < "/proc/$1/stat" || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

forward_kept() {  # pass on, in order, the kept signals the step catches by now; 1 while one still waits
  while [ "$FORWARDED" -lt "${#KEPT_SIGNALS[@]}" ]; do
    catches "$STEP_PID" "${KEPT_SIGNALS[$FORWARDED]}" || return 1
    kill -"${KEPT_SIGNALS[$FORWARDED]}" "$STEP_PID" 2>/dev/null
    FORWARDED=$((FORWARDED + 1))
  done
}

resend() {  # the signals passed on so far, again
  local i
  for ((i = 0; i < FORWARDED; i++)); do kill -"${KEPT_SIGNALS[$i]}" "$STEP_PID" 2>/dev/null; done
}

wait_for_step() {
  local status next=$((SECONDS + RESEND_S))
  while running "$STEP_PID"; do
    if forward_kept; then sleep 1; else sleep 0.2; fi
    if [ "$SECONDS" -ge "$next" ]; then
      resend
      next=$((SECONDS + RESEND_S))
    fi
  done
  while :; do  # `wait` can return early, >128, if a trapped signal arrives during it: then wait again
    wait "$STEP_PID"
    status=$?
    [ "$status" -gt 128 ] && [ -e "/proc/$STEP_PID" ] || break
  done
  return "$status"
}
