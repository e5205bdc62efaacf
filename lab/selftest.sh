#!/usr/bin/env bash
# lab/selftest.sh — prove that the lab's NATs behave as claimed, with numbers.
#
#   lab/selftest.sh            every check (each in a fresh lab via `lab.sh run`); exit 1 if any fails
#   lab/selftest.sh CHECK...   some of: sequential filtering punch random preserving delay load
#
# Needs no n4 binary: python helpers (lab/n4-lab-udp.py) play both ends.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LAB=$HERE/lab.sh
UDP=$HERE/n4-lab-udp.py
PY=$(python3 -c 'import sys; print(sys.executable)')

in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
pass() { printf 'PASS %-11s %s\n' "$CHECK" "$*"; }
fail() { printf 'FAIL %-11s %s\n' "$CHECK" "$*"; exit 1; }
fail_soft() { printf 'FAIL %-11s %s\n' "$CHECK" "$*"; }

# Ports the server sees for N probes from ROLE-namespace, each from a fresh socket.
# usage: observed_ports NS N [INTERVAL] [BIND]  -> space-separated ports on stdout
observed_ports() {
  local ns=$1 n=$2 interval=${3:-0} bind=${4:-0} out
  out=$(mktemp)
  in_ns "$LAB_NS_SERVER" "$PY" "$UDP" listen --port 9999 --count "$n" --timeout 3 >"$out" &
  local lp=$!
  sleep 0.3
  in_ns "$ns" "$PY" "$UDP" probe --to "$LAB_IP_SERVER:9999" --count "$n" --interval "$interval" \
    --bind "$bind"
  wait $lp || true
  sed -n 's/^FROM [0-9.]*:\([0-9]*\) .*/\1/p' "$out" | tr '\n' ' '
  rm -f "$out"
}

steps() { # PORT... -> differences between neighbours
  local prev="" p d=""
  for p in "$@"; do [ -n "$prev" ] && d+="$((p - prev)) "; prev=$p; done
  printf '%s' "$d"
}

# ------------------------------------------------------------------------------- the checks
check_sequential() {
  local a b a2
  a=$(observed_ports "$LAB_NS_A" 10)
  b=$(observed_ports "$LAB_NS_B" 10)
  a2=$(observed_ports "$LAB_NS_A" 3)
  echo "  nat-a ports: $a then $a2"
  echo "  nat-b ports: $b"
  local all
  all=$(steps $a $a2)
  [ "$(steps $a $a2 | tr -d ' 1')" = "" ] && [ "$(steps $b | tr -d ' 1')" = "" ] ||
    fail "steps not all +1: a: $all b: $(steps $b)"
  set -- $a; [ "$1" = "$LAB_PORT_BASE" ] || fail "nat-a's first port $1, want $LAB_PORT_BASE"
  pass "each NAT hands out $LAB_PORT_BASE, +1, +1, … (own counter per NAT; 23 mappings)"
}

check_filtering() {
  # host-a maps 30000 -> server:9999.  Then the server answers from 9998 first (same IP, other
  # port), then from 9999.  APD filtering: only the 9999 answer may arrive.  Also host-b (another
  # IP) knocks on the same external port.  Drop counters of nat-a must rise.
  local ext
  in_ns "$LAB_NS_SERVER" "$PY" - <<'EOF' >"$LAB_DIR/filter-server.log" &
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 9999))
data, src = s.recvfrom(100)
print("EXT %s %d" % src, flush=True)
o = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); o.bind(("0.0.0.0", 9998))
for _ in range(3):
    o.sendto(b"from server:9998 (must be dropped)", src)
time.sleep(0.5)
s.sendto(b"from server:9999 (the mapped destination)", src)
EOF
  local sp=$!
  sleep 0.3
  # host-a sends once (line resends every 0.5 s while waiting; same socket, same mapping).
  local before after
  before=$(in_ns "$LAB_NS_NAT_A" nft list chain ip n4lab filter_in | sed -n 's/.*packets \([0-9]*\).*/\1/p')
  in_ns "$LAB_NS_A" "$PY" "$UDP" line --bind 30000 --to "$LAB_IP_SERVER:9999" --text "map me" \
    --timeout 3 >"$LAB_DIR/filter-a.log" &
  local ap=$!
  sleep 0.2
  ext=""
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    ext=$(sed -n 's/^EXT [0-9.]* //p' "$LAB_DIR/filter-server.log")
    [ -n "$ext" ] && break; sleep 0.1
  done
  [ -n "$ext" ] || fail "server never saw host-a"
  # A third party (host-b, through nat-b) knocks too.
  in_ns "$LAB_NS_B" "$PY" "$UDP" probe --to "$LAB_IP_NAT_A:$ext" --count 3
  wait $ap || true
  wait $sp || true
  after=$(in_ns "$LAB_NS_NAT_A" nft list chain ip n4lab filter_in | sed -n 's/.*packets \([0-9]*\).*/\1/p')
  local got
  got=$(sed -n 's/^RECV //p' "$LAB_DIR/filter-a.log")
  echo "  host-a 192.168.1.101:30000 mapped to $LAB_IP_NAT_A:$ext; first datagram back: $got"
  echo "  nat-a drop counter: $before -> $after"
  [[ $got == *"server:9999"* ]] || fail "host-a got '$got'"
  [ $((after - before)) -ge 6 ] || fail "expected >= 6 drops (3 from server:9998, 3 from nat-b)"
  pass "unsolicited UDP (other port of the same host, other host) dropped; $((after - before)) drops counted"
}

check_punch() {
  # A manual N4 round in python: each side learns its external port from the server, then
  # 25 sockets on each side fire at peer_port + 20.  Sequential NATs line up one pair.
  local out pa pb
  out=$(mktemp)
  in_ns "$LAB_NS_SERVER" "$PY" "$UDP" listen --port 9999 --count 2 --timeout 3 >"$out" &
  local lp=$!
  sleep 0.3
  in_ns "$LAB_NS_A" "$PY" "$UDP" probe --bind 30000 --to "$LAB_IP_SERVER:9999"
  in_ns "$LAB_NS_B" "$PY" "$UDP" probe --bind 31000 --to "$LAB_IP_SERVER:9999"
  wait $lp || true
  pa=$(sed -n "s/^FROM $LAB_IP_NAT_A:\([0-9]*\) .*/\1/p" "$out")
  pb=$(sed -n "s/^FROM $LAB_IP_NAT_B:\([0-9]*\) .*/\1/p" "$out")
  rm -f "$out"
  [ -n "$pa" ] && [ -n "$pb" ] || fail "server did not see both sides"
  in_ns "$LAB_NS_A" "$PY" "$UDP" punch --bind 30001 --count 25 --to "$LAB_IP_NAT_B:$((pb + 20))" \
    --timeout 5 >"$LAB_DIR/punch-a.log" &
  local ap=$!
  in_ns "$LAB_NS_B" "$PY" "$UDP" punch --bind 31001 --count 25 --to "$LAB_IP_NAT_A:$((pa + 20))" \
    --timeout 5 >"$LAB_DIR/punch-b.log" || true
  wait $ap || true
  echo "  server saw A at $LAB_IP_NAT_A:$pa, B at $LAB_IP_NAT_B:$pb; targets +20"
  echo "  host-a: $(cat "$LAB_DIR/punch-a.log")"
  echo "  host-b: $(cat "$LAB_DIR/punch-b.log")"
  grep -q '^WIN' "$LAB_DIR/punch-a.log" && grep -q '^WIN' "$LAB_DIR/punch-b.log" ||
    fail "no two-sided punch"
  pass "two-sided punch through both sequential NATs (offset 20, 25 sockets)"
}

check_random() {
  local a
  a=$(observed_ports "$LAB_NS_A" 10)
  echo "  nat-a ports: $a"
  echo "  steps: $(steps $a)"
  [ "$(steps $a | tr -d ' 1')" != "" ] || fail "random NAT gave a +1 sequence"
  pass "random external ports inside $LAB_PORT_BASE..$((LAB_PORT_BASE + LAB_PORT_COUNT - 1))"
}

check_preserving() {
  local a b
  a=$(observed_ports "$LAB_NS_A" 1 0 30000)
  b=$(observed_ports "$LAB_NS_A" 1 0 30123)
  echo "  host-a :30000 -> $LAB_IP_NAT_A:$a, :30123 -> $LAB_IP_NAT_A:$b"
  [ "$a" = "30000 " ] && [ "$b" = "30123 " ] || fail "source port not kept"
  pass "source port kept"
}

check_delay() {
  local r
  r=$(in_ns "$LAB_NS_A" "$PY" "$UDP" ping --to "$LAB_IP_SERVER" --count 40 --interval 0.05 | tail -n1)
  echo "  one-way delay ${LAB_DELAY_MS} ms per router crossing; host-a -> server ICMP: $r"
  local med
  med=$(sed -n 's|.*= [0-9.]*/\([0-9.]*\)/.*|\1|p' <<<"$r")
  "$PY" -c "import sys; m=float('$med'); w=2*float('$LAB_DELAY_MS'); sys.exit(0 if w <= m <= w + 3 else 1)" ||
    fail "median RTT $med ms, want 2*$LAB_DELAY_MS (+3) ms"
  pass "median RTT $med ms for requested 2 x $LAB_DELAY_MS ms"
}

check_load() {
  # One probe per second from host-a for 6 s; the port advances by (flows in between) + 1.
  local a
  a=$(observed_ports "$LAB_NS_A" 7 1)
  echo "  background $LAB_LOAD_A flows/s behind nat-a; probe ports 1 s apart: $a"
  echo "  steps: $(steps $a)"
  set -- $a
  local first=$1 n=$#; local last=${!n}
  local rate=$(( (last - first) / (n - 1) - 1 ))
  "$PY" -c "import sys; r=$rate; l=float('$LAB_LOAD_A'); sys.exit(0 if 0.8*l <= r <= 1.2*l else 1)" ||
    fail "counter advanced $rate/s, want about $LAB_LOAD_A/s"
  pass "counter advances ${rate}/s with λ=$LAB_LOAD_A/s"
}

# ------------------------------------------------------------------------------- driver
if [ "${1:-}" = _in_lab ]; then # internal: run inside `lab.sh run`
  CHECK=$2
  "check_$2"
  exit 0
fi

ALL="sequential filtering punch random preserving delay delay0 load demo-ref"
checks=${*:-$ALL}
failed=0
before=$("$LAB" list)
for c in $checks; do
  opts=()
  if [ "$c" = demo-ref ]; then
    # The demo path end to end, with the Python model of the original v1 tool as `n4`.
    echo "== demo-ref (LAB_N4=n4-ref.py lab.sh demo)"
    if LAB_N4=$HERE/n4-ref.py "$LAB" demo >"${TMPDIR:-/tmp}/n4-lab-demo-ref.log" 2>&1; then
      grep -E 'WIN \]|RECV' "${TMPDIR:-/tmp}/n4-lab-demo-ref.log" | sed 's/^/  /'
      CHECK=demo-ref pass "demo with the v1 model: WIN both sides, a line each way"
    else
      sed 's/^/  /' "${TMPDIR:-/tmp}/n4-lab-demo-ref.log"; CHECK=demo-ref fail_soft "the demo failed (log above)"; failed=1
    fi
    continue
  fi
  case $c in
    sequential|filtering|punch) ;;
    random) opts=(--nat random) ;;
    preserving) opts=(--nat preserving) ;;
    delay) opts=(--delay 25) ;;
    delay0) c=delay ;;
    load) opts=(--load 200) ;;
    *) echo "unknown check $c (have: $ALL)"; exit 2 ;;
  esac
  echo "== $c ${opts[*]}"
  "$LAB" run "${opts[@]}" -- "$0" _in_lab "$c" || failed=1
done
# Labs this selftest left behind (others' labs, present before we started, do not count).
left=$(comm -13 <(printf '%s\n' "$before" | sort) <("$LAB" list | sort) | grep -c . || true)
echo "== labs left behind by this selftest: $left"
[ "$left" = 0 ] || failed=1
exit $failed
