#!/bin/sh
# A minimal stand-in `claude` CLI for the soak test in test_operations.py.
#
# It speaks the same stream-json subset as fake_claude.py (reads control lines until the user
# line, then prints init, message_start, a text delta and a result line), but as a shell
# script: a Python fake costs ~50 ms of interpreter start-up per run (far more on a loaded
# machine), which would make hundreds of runs take minutes.  Directives in the user text:
#   [[crash]]    a text delta, then exit 3 without a result line
#   [[garbage]]  lines that are not JSON, then exit 0
#   [[sleep]]    wait 1 s before answering (to hold a slot)
#   otherwise    answer "soak answer"
mode=ok
while IFS= read -r line; do
  case "$line" in
    *'"type": "user"'*)
      case "$line" in
        *'[[crash]]'*) mode=crash ;;
        *'[[garbage]]'*) mode=garbage ;;
        *'[[sleep]]'*) mode=sleep ;;
      esac
      break ;;
  esac
done
echo '{"type": "system", "subtype": "init", "model": "fake"}'
if [ "$mode" = garbage ]; then
  echo 'not JSON at all'
  exit 0
fi
echo '{"type": "stream_event", "event": {"type": "message_start", "message": {"usage": {"input_tokens": 3, "output_tokens": 1}}}}'
if [ "$mode" = sleep ]; then
  sleep 1
fi
echo '{"type": "stream_event", "event": {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "soak answer"}}}'
if [ "$mode" = crash ]; then
  echo 'fatal: simulated crash' >&2
  exit 3
fi
echo '{"type": "result", "subtype": "success", "is_error": false, "result": "soak answer", "stop_reason": "end_turn", "usage": {"input_tokens": 3, "output_tokens": 2}}'
