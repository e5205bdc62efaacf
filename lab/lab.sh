#!/usr/bin/env bash
# lab/lab.sh — two real Linux NAT4s in network namespaces, for N4.
#
#   host-a 192.168.1.101 ── nat-a ──┐                ┌── nat-b ── host-b 192.168.0.112
#          192.168.1.0/24  198.51.100.3 ── router ── 203.0.113.12   192.168.0.0/24
#                                            │
#                                     server 192.0.2.2
#
# --one-nat: host-b sits beside host-a in nat-a's LAN (a bridge), as 192.168.1.102; no nat-b.
#
# Run as root.  `lab.sh help` prints the interface; lab/README.md explains it.
# Nothing here touches the root namespace's network: every link is created inside the lab's
# own namespaces, every sysctl is set inside them, and `down` deletes them.
set -euo pipefail

LAB_HOME=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$LAB_HOME/.." && pwd)
LAB_RUN_DIR=${LAB_RUN_DIR:-/run/n4-lab}
ROLES="server router nat-a nat-b host-a host-b"

# Fixed addresses (TEST-NET-1/2/3 on the "internet", RFC 1918 behind the NATs).
IP_SERVER=192.0.2.2        IP_ROUTER_S=192.0.2.1
IP_NAT_A=198.51.100.3      IP_ROUTER_A=198.51.100.1
IP_NAT_B=203.0.113.12      IP_ROUTER_B=203.0.113.1
IP_A=192.168.1.101         IP_NAT_A_LAN=192.168.1.1
IP_B=192.168.0.112         IP_NAT_B_LAN=192.168.0.1
IP_B_ONE_NAT=192.168.1.102 # host-b's address with --one-nat (in nat-a's LAN, beside host-a)
SINK_PORTS=40000-59999     # background flows go to server:$SINK_PORTS (dropped there, silently)

usage() {
  cat <<'EOF'
lab/lab.sh — real-kernel NAT lab for N4 (run as root)

  lab.sh up [OPTIONS]              build a lab; print its env file (KEY=VALUE lines) on stdout;
                                   the lab lives until `lab.sh down NAME`
  lab.sh down NAME|ENVFILE|stale|all   tear a lab down; stale: labs of a `run`/`demo` whose
                                   lab.sh died (SIGKILL); all: EVERY lab on this machine, also
                                   other users' running ones
  lab.sh exec [NAME] ROLE CMD...   run CMD inside ROLE's namespace (NAME may be left out when
                                   LAB_NAME is set, e.g. inside `run`)
  lab.sh run [OPTIONS] -- CMD...   up, run CMD (on the host, with the LAB_* variables exported),
                                   down (always); exits with CMD's status
  lab.sh demo [OPTIONS]            build n4, punch through two NATs, send a line each way, tear down
  lab.sh selftest                  prove the lab: port sequences, filtering, delay, load, a punch
  lab.sh list                      list labs (namespaces) present on this machine

ROLES: server router nat-a nat-b host-a host-b   (aliases: a = host-a, b = host-b;
       --one-nat: no nat-b)

OPTIONS (each also settable by the environment variable shown; options win):
  --nat KIND        LAB_NAT        sequential (default) | blocks | random | preserving, both NATs
                                   (blocks: sequential inside blocks of --block-size ports, the
                                   blocks in a shuffled order, as carrier NATs hand them out)
  --nat-a KIND      LAB_NAT_A      this NAT only (default: --nat)
  --nat-b KIND      LAB_NAT_B
  --delay MS        LAB_DELAY_MS   one-way delay the WAN router adds to every packet it forwards
                                   (RTT host<->server and host<->host = 2*MS); default 0
  --load RATE       LAB_LOAD       background new UDP flows per second behind EACH NAT; default 0
  --load-a RATE     LAB_LOAD_A     behind nat-a only (default: --load)
  --load-b RATE     LAB_LOAD_B
  --port-base P     LAB_PORT_BASE  first external port of the NATs' pool; default 20000
  --port-count N    LAB_PORT_COUNT pool size; default 10000 (ports wrap inside the pool)
  --port-step K     LAB_PORT_STEP  sequential step; default 1
  --block-size B    LAB_BLOCK_SIZE blocks: ports per block; default 64
  --seed N          LAB_SEED       seed of the background-load generators; default 1
  --one-nat         LAB_ONE_NAT=1  two hosts behind one NAT: host-b sits in nat-a's LAN as
                                   192.168.1.102 beside host-a (a bridge); there is no nat-b
                                   (LAB_NS_NAT_B, LAB_IP_NAT_B, LAB_NAT_B then name nat-a);
                                   --load RATE = RATE flows/s at nat-a (from host-a);
                                   --nat-b and --load-b are refused
  --hairpin         LAB_HAIRPIN=1  with --one-nat: nat-a hairpins: a LAN datagram to nat-a's
                                   public address goes out through its NAT and comes back in
                                   (reflected by the router, undelayed), so the sender gets a
                                   mapping and the receiver's mapping/filtering applies as to
                                   any outside datagram (without it, nat-a takes it itself)
  --keep            LAB_KEEP=1     `run`/`demo`: leave the lab up afterwards (print its name)
  demo only:        LAB_N4=PATH    n4 binary to use instead of building target/release/n4
                    LAB_N4_SERVER_ARGS, LAB_N4_CLIENT_ARGS   extra arguments for n4 -s / n4 -c

Exported to CMD by `run` and written to the env file by `up`:
  LAB_NAME LAB_DIR LAB_ENV LAB_SH LAB_OWNER_PID (run/demo: the lab.sh pid; up: empty)
  LAB_NS_SERVER LAB_NS_ROUTER LAB_NS_NAT_A LAB_NS_NAT_B LAB_NS_A LAB_NS_B
  LAB_IP_SERVER=192.0.2.2 LAB_IP_NAT_A=198.51.100.3 LAB_IP_NAT_B=203.0.113.12
  LAB_IP_A=192.168.1.101 LAB_IP_B=192.168.0.112 (--one-nat: 192.168.1.102)
  LAB_NAT_A LAB_NAT_B LAB_DELAY_MS LAB_LOAD_A LAB_LOAD_B LAB_PORT_BASE LAB_PORT_COUNT LAB_PORT_STEP
  LAB_ONE_NAT (0|1) LAB_HAIRPIN (0|1)
EOF
}

log() { printf 'lab: %s\n' "$*" >&2; }
die() { printf 'lab: error: %s\n' "$*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (network namespaces, nftables)"; }

ensure_tools() {
  local missing=()
  command -v ip >/dev/null || missing+=(iproute2)
  command -v nft >/dev/null || missing+=(nftables)
  command -v iptables >/dev/null || missing+=(iptables)
  command -v python3 >/dev/null || missing+=(python3)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >&2 ||
      { DEBIAN_FRONTEND=noninteractive apt-get update >&2 &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >&2; } ||
      die "could not install ${missing[*]}"
  fi
  PY=$(python3 -c 'import sys; print(sys.executable)')
}

# ---------------------------------------------------------------------------------- options
parse_opts() {
  NAT=${LAB_NAT:-sequential}
  NAT_A=${LAB_NAT_A:-} NAT_B=${LAB_NAT_B:-}
  DELAY_MS=${LAB_DELAY_MS:-0}
  LOAD=${LAB_LOAD:-0}
  LOAD_A=${LAB_LOAD_A:-} LOAD_B=${LAB_LOAD_B:-}
  PORT_BASE=${LAB_PORT_BASE:-20000}
  PORT_COUNT=${LAB_PORT_COUNT:-10000}
  PORT_STEP=${LAB_PORT_STEP:-1}
  BLOCK_SIZE=${LAB_BLOCK_SIZE:-64}
  SEED=${LAB_SEED:-1}
  KEEP=${LAB_KEEP:-0}
  ONE_NAT=${LAB_ONE_NAT:-0}
  HAIRPIN=${LAB_HAIRPIN:-0}
  REST=()
  while [ $# -gt 0 ]; do
    case $1 in
      --nat) NAT=$2; shift 2 ;;
      --nat-a) NAT_A=$2; shift 2 ;;
      --nat-b) NAT_B=$2; shift 2 ;;
      --delay) DELAY_MS=$2; shift 2 ;;
      --load) LOAD=$2; shift 2 ;;
      --load-a) LOAD_A=$2; shift 2 ;;
      --load-b) LOAD_B=$2; shift 2 ;;
      --port-base) PORT_BASE=$2; shift 2 ;;
      --port-count) PORT_COUNT=$2; shift 2 ;;
      --port-step) PORT_STEP=$2; shift 2 ;;
      --block-size) BLOCK_SIZE=$2; shift 2 ;;
      --seed) SEED=$2; shift 2 ;;
      --keep) KEEP=1; shift ;;
      --one-nat) ONE_NAT=1; shift ;;
      --hairpin) HAIRPIN=1; shift ;;
      --) shift; REST=("$@"); break ;;
      -h|--help) usage; exit 0 ;;
      *) die "unknown option $1 (see lab.sh help)" ;;
    esac
  done
  case $ONE_NAT in 0|1) ;; *) die "LAB_ONE_NAT wants 0 or 1, got '$ONE_NAT'" ;; esac
  case $HAIRPIN in 0|1) ;; *) die "LAB_HAIRPIN wants 0 or 1, got '$HAIRPIN'" ;; esac
  if [ "$ONE_NAT" = 1 ]; then
    # One NAT: nat-a's settings are the only ones; a setting for nat-b has nothing to act on.
    [ -z "$NAT_B" ] || die "--one-nat: there is no nat-b (--nat-b/LAB_NAT_B); use --nat or --nat-a"
    [ -z "$LOAD_B" ] || die "--one-nat: there is no nat-b (--load-b/LAB_LOAD_B); use --load or --load-a"
    NAT_A=${NAT_A:-$NAT}; NAT_B=$NAT_A
    LOAD_A=${LOAD_A:-$LOAD} LOAD_B=0
  else
    [ "$HAIRPIN" = 0 ] || die "--hairpin needs --one-nat (two hosts behind one NAT)"
    NAT_A=${NAT_A:-$NAT} NAT_B=${NAT_B:-$NAT}
    LOAD_A=${LOAD_A:-$LOAD} LOAD_B=${LOAD_B:-$LOAD}
  fi
  local k
  for k in "$NAT_A" "$NAT_B"; do
    case $k in sequential|blocks|random|preserving) ;; *) die "unknown NAT kind '$k'" ;; esac
  done
  [[ $DELAY_MS =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--delay wants milliseconds, got '$DELAY_MS'"
  [[ $LOAD_A =~ ^[0-9]+([.][0-9]+)?$ && $LOAD_B =~ ^[0-9]+([.][0-9]+)?$ ]] ||
    die "--load wants flows per second"
  [[ $PORT_BASE =~ ^[0-9]+$ && $PORT_COUNT =~ ^[0-9]+$ && $PORT_STEP =~ ^[0-9]+$ &&
     $BLOCK_SIZE =~ ^[0-9]+$ ]] || die "port options want integers"
  [ "$BLOCK_SIZE" -ge 1 ] && [ "$BLOCK_SIZE" -le "$PORT_COUNT" ] ||
    die "--block-size must be 1..--port-count ($PORT_COUNT)"
  [ "$PORT_COUNT" -ge 1 ] && [ "$PORT_STEP" -ge 1 ] && [ "$PORT_BASE" -ge 1 ] &&
    [ $((PORT_BASE + (PORT_COUNT - 1) * PORT_STEP)) -le 65535 ] ||
    die "port pool $PORT_BASE + ($PORT_COUNT-1)*$PORT_STEP leaves 1..65535"
}

# ---------------------------------------------------------------------------------- naming
ns_of() { # NAME ROLE -> namespace
  local role=$2
  case $role in a) role=host-a ;; b) role=host-b ;; esac
  case " $ROLES " in *" $role "*) ;; *) die "unknown role '$2' (roles: $ROLES)" ;; esac
  printf '%s-%s' "$1" "$role"
}

resolve_name() { # NAME | ENVFILE | LAB_NAME -> NAME
  local x=${1:-${LAB_NAME:-}}
  [ -n "$x" ] || die "which lab? give its NAME (see lab.sh list)"
  if [ -f "$x" ]; then x=$(sed -n 's/^LAB_NAME=//p' "$x"); fi
  x=${x%/}; x=${x##*/}
  [[ $x =~ ^n4l-[0-9a-z]+$ ]] || die "'$x' is not a lab name (n4l-…)"
  printf '%s' "$x"
}

new_name() {
  local id
  while :; do
    id=$(printf '%x%02x' $$ $((RANDOM % 256)))
    [ -e "/run/netns/n4l-$id-server" ] || [ -e "$LAB_RUN_DIR/n4l-$id" ] || break
  done
  printf 'n4l-%s' "$id"
}

# ---------------------------------------------------------------------------------- NAT rules
nat_rules() { # KIND EXT_IP -> nft ruleset for a NAT box (wan = outside, lan = inside)
  local kind=$1 ext=$2 snat i sep=""
  case $kind in
    sequential|random)
      # The counter/random number must go through a map: `numgen inc mod N offset BASE` puts a
      # host-endian number in the port register and the ports come out byte-swapped.
      local gen=inc; [ "$kind" = random ] && gen=random
      snat="snat ip to $ext : numgen $gen mod $PORT_COUNT map {"
      local map=""
      for ((i = 0; i < PORT_COUNT; i++)); do
        map+="$sep$i : $((PORT_BASE + i * PORT_STEP))"; sep=", "
      done
      snat+=" $map }"
      ;;
    blocks)
      # The i-th new mapping gets port BASE + block(i / B)·B + i % B, the blocks in an order
      # shuffled with the seed: sequential inside a block, a jump to another block after it.
      # (The pool is the whole blocks that fit in --port-count.)
      local nblocks=$((PORT_COUNT / BLOCK_SIZE)) order
      order=$("$PY" -c 'import random,sys; n=int(sys.argv[1]); o=list(range(n)); random.Random(int(sys.argv[2])).shuffle(o); print(" ".join(map(str,o)))' "$nblocks" "$((SEED * 7919 + ${3:-0}))")
      local -a blk=($order)
      snat="snat ip to $ext : numgen inc mod $((nblocks * BLOCK_SIZE)) map {"
      local map=""
      for ((i = 0; i < nblocks * BLOCK_SIZE; i++)); do
        map+="$sep$i : $((PORT_BASE + blk[i / BLOCK_SIZE] * BLOCK_SIZE + i % BLOCK_SIZE))"; sep=", "
      done
      snat+=" $map }"
      ;;
    preserving)
      # Plain SNAT keeps the source port whenever the resulting tuple is free.
      snat="snat ip to $ext"
      ;;
  esac
  cat <<EOF
table ip n4lab {
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan" meta l4proto udp $snat
    oifname "wan" masquerade
  }
  # Address-and-port-dependent filtering: an inbound UDP datagram that matches no mapping
  # (conntrack state new) is dropped before it can create any state.
  chain filter_in {
    type filter hook prerouting priority -150; policy accept;
    iifname "wan" meta l4proto udp ct state new counter drop
  }
}
EOF
}

# ---------------------------------------------------------------------------------- up / down
nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

start_bg() { # NS LOGFILE PIDFILE CMD... : a detached process inside NS
  local ns=$1 logf=$2 pidf=$3; shift 3
  ip netns exec "$ns" setsid "$@" >"$logf" 2>&1 </dev/null &
  echo $! >"$pidf"
}

lab_up() { # NAME; uses the parsed options; sets DIR
  NAME=$1
  DIR=$LAB_RUN_DIR/$NAME
  mkdir -p "$DIR"
  local S R NA NB HA HB
  S=$(ns_of "$NAME" server) R=$(ns_of "$NAME" router)
  NA=$(ns_of "$NAME" nat-a) NB=$(ns_of "$NAME" nat-b)
  HA=$(ns_of "$NAME" host-a) HB=$(ns_of "$NAME" host-b)
  # With --one-nat there is no nat-b: host-b is a second host in nat-a's LAN.
  local ip_b=$IP_B nats="$NA $NB"
  if [ "$ONE_NAT" = 1 ]; then
    ip_b=$IP_B_ONE_NAT nats=$NA
    local hp=""; [ "$HAIRPIN" = 0 ] || hp=", hairpinning"
    log "building $NAME (one NAT: host-a and host-b behind nat-a $NAT_A$hp, delay ${DELAY_MS} ms, load $LOAD_A per s)"
  else
    log "building $NAME (nat-a $NAT_A, nat-b $NAT_B, delay ${DELAY_MS} ms, load $LOAD_A/$LOAD_B per s)"
  fi
  local ns
  for ns in "$S" "$R" $nats "$HA" "$HB"; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
  done
  # Links, each created directly inside its namespaces (never in the root namespace).
  ip -n "$S" link add eth0 type veth peer name s0 netns "$R"
  ip -n "$NA" link add wan type veth peer name a0 netns "$R"
  local devs=("$S eth0" "$R s0" "$R a0" "$NA wan" "$NA lan" "$HA eth0" "$HB eth0")
  if [ "$ONE_NAT" = 1 ]; then
    # nat-a's LAN is a bridge "lan" (the LAN address sits on it) with one port per host.
    ip -n "$NA" link add lan type bridge
    ip -n "$HA" link add eth0 type veth peer name lan-a netns "$NA"
    ip -n "$HB" link add eth0 type veth peer name lan-b netns "$NA"
    ip -n "$NA" link set lan-a master lan
    ip -n "$NA" link set lan-b master lan
    devs+=("$NA lan-a" "$NA lan-b")
  else
    ip -n "$NB" link add wan type veth peer name b0 netns "$R"
    ip -n "$HA" link add eth0 type veth peer name lan netns "$NA"
    ip -n "$HB" link add eth0 type veth peer name lan netns "$NB"
    devs+=("$R b0" "$NB wan" "$NB lan")
  fi

  ip -n "$S" addr add $IP_SERVER/24 dev eth0
  ip -n "$R" addr add $IP_ROUTER_S/24 dev s0
  ip -n "$R" addr add $IP_ROUTER_A/24 dev a0
  ip -n "$NA" addr add $IP_NAT_A/24 dev wan
  ip -n "$NA" addr add $IP_NAT_A_LAN/24 dev lan
  ip -n "$HA" addr add $IP_A/24 dev eth0
  ip -n "$HB" addr add "$ip_b/24" dev eth0
  if [ "$ONE_NAT" = 0 ]; then
    ip -n "$R" addr add $IP_ROUTER_B/24 dev b0
    ip -n "$NB" addr add $IP_NAT_B/24 dev wan
    ip -n "$NB" addr add $IP_NAT_B_LAN/24 dev lan
  fi
  local dev
  for dev in "${devs[@]}"; do
    set -- $dev
    ip -n "$1" link set "$2" up
  done
  ip -n "$S" route add default via $IP_ROUTER_S
  ip -n "$NA" route add default via $IP_ROUTER_A
  ip -n "$HA" route add default via $IP_NAT_A_LAN
  if [ "$ONE_NAT" = 1 ]; then
    ip -n "$HB" route add default via $IP_NAT_A_LAN
  else
    ip -n "$NB" route add default via $IP_ROUTER_B
    ip -n "$HB" route add default via $IP_NAT_B_LAN
  fi
  for ns in "$R" $nats; do
    nsx "$ns" sysctl -qw net.ipv4.ip_forward=1
  done
  if [ "$HAIRPIN" = 1 ]; then
    # Hairpinning by reflection: nat-a routes a LAN UDP datagram for its own public address
    # out of wan instead of delivering it to itself (a policy rule ahead of the local table;
    # a ping of the public address is still answered by nat-a); the router sends it straight
    # back (not delayed, no redirect); nat-a takes it in on wan although its source is
    # nat-a's own address (accept_local).  On the way out it gets the sender's mapping for
    # that destination (the same SNAT and port counter as for any destination); on the way in
    # it meets the same filtering as any datagram from outside: it passes only as the reply
    # to a mapping of the receiver towards exactly that address and port.
    ip -n "$NA" rule add pref 100 lookup local
    ip -n "$NA" rule del pref 0 lookup local
    ip -n "$NA" rule add pref 10 iif lan to $IP_NAT_A ipproto udp lookup 100  # UDP only
    ip -n "$NA" route add default via $IP_ROUTER_A dev wan table 100
    nsx "$NA" sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.wan.rp_filter=0 \
      net.ipv4.conf.wan.accept_local=1
    nsx "$R" sysctl -qw net.ipv4.conf.all.send_redirects=0 net.ipv4.conf.a0.send_redirects=0
    nsx "$R" iptables -w -A FORWARD -i a0 -o a0 -j ACCEPT  # ahead of the delay's NFQUEUE
  fi

  nat_rules "$NAT_A" $IP_NAT_A 1 >"$DIR/nat-a.nft"
  nsx "$NA" nft -f "$DIR/nat-a.nft"
  if [ "$ONE_NAT" = 0 ]; then
    nat_rules "$NAT_B" $IP_NAT_B 2 >"$DIR/nat-b.nft"
    nsx "$NB" nft -f "$DIR/nat-b.nft"
  fi
  # The server silently drops the background flows (no ICMP storm back through the NATs).
  nsx "$S" nft -f - <<EOF
table ip n4lab {
  chain input {
    type filter hook input priority 0; policy accept;
    udp dport $SINK_PORTS drop
  }
}
EOF

  if [ "$DELAY_MS" != 0 ]; then
    start_bg "$R" "$DIR/delay.log" "$DIR/delay.pid" \
      "$PY" "$LAB_HOME/n4-lab-delay.py" --ready-file "$DIR/delay.ready" "0:$DELAY_MS"
    local i
    for ((i = 0; i < 100; i++)); do
      [ -s "$DIR/delay.ready" ] && break
      kill -0 "$(cat "$DIR/delay.pid")" 2>/dev/null || break
      sleep 0.05
    done
    [ -s "$DIR/delay.ready" ] || die "delay program did not start: $(cat "$DIR/delay.log")"
    # No --queue-bypass: if the delay program dies, the WAN goes dark (loud, not silently fast).
    nsx "$R" iptables -w -A FORWARD -j NFQUEUE --queue-num 0
  fi
  if [ "$LOAD_A" != 0 ]; then
    start_bg "$HA" "$DIR/load-a.log" "$DIR/load-a.pid" "$PY" "$LAB_HOME/n4-lab-load.py" \
      --rate "$LOAD_A" --dest $IP_SERVER --ports $SINK_PORTS --seed "$SEED"
  fi
  if [ "$LOAD_B" != 0 ]; then
    start_bg "$HB" "$DIR/load-b.log" "$DIR/load-b.pid" "$PY" "$LAB_HOME/n4-lab-load.py" \
      --rate "$LOAD_B" --dest $IP_SERVER --ports $SINK_PORTS --seed "$((SEED + 1))"
  fi

  # With --one-nat, the nat-b variables name the NAT host-b is behind: nat-a.
  local env_nb=$NB env_ip_nb=$IP_NAT_B
  [ "$ONE_NAT" = 1 ] && env_nb=$NA env_ip_nb=$IP_NAT_A
  cat >"$DIR/env" <<EOF
LAB_NAME=$NAME
LAB_DIR=$DIR
LAB_ENV=$DIR/env
LAB_SH=$LAB_HOME/lab.sh
LAB_OWNER_PID=${OWNER_PID:-}
LAB_NS_SERVER=$S
LAB_NS_ROUTER=$R
LAB_NS_NAT_A=$NA
LAB_NS_NAT_B=$env_nb
LAB_NS_A=$HA
LAB_NS_B=$HB
LAB_IP_SERVER=$IP_SERVER
LAB_IP_NAT_A=$IP_NAT_A
LAB_IP_NAT_B=$env_ip_nb
LAB_IP_A=$IP_A
LAB_IP_B=$ip_b
LAB_NAT_A=$NAT_A
LAB_NAT_B=$NAT_B
LAB_DELAY_MS=$DELAY_MS
LAB_LOAD_A=$LOAD_A
LAB_LOAD_B=$LOAD_B
LAB_PORT_BASE=$PORT_BASE
LAB_PORT_COUNT=$PORT_COUNT
LAB_PORT_STEP=$PORT_STEP
LAB_BLOCK_SIZE=$BLOCK_SIZE
LAB_ONE_NAT=$ONE_NAT
LAB_HAIRPIN=$HAIRPIN
EOF
  # Reachability check: both NATs reach the server through the router.
  nsx "$HA" "$PY" "$LAB_HOME/n4-lab-udp.py" ping --to $IP_SERVER --timeout 3 >/dev/null ||
    die "host-a cannot reach the server"
  nsx "$HB" "$PY" "$LAB_HOME/n4-lab-udp.py" ping --to $IP_SERVER --timeout 3 >/dev/null ||
    die "host-b cannot reach the server"
  log "up: $NAME (env file $DIR/env)"
}

lab_down() { # NAME
  local name=$1 role ns pids i
  for role in $ROLES; do
    ns=$name-$role
    [ -e "/run/netns/$ns" ] || continue
    # Only processes living inside this lab's namespaces: the ones the lab (or its user) started.
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    if [ -n "$pids" ]; then
      kill -TERM $pids 2>/dev/null || true
      for ((i = 0; i < 20; i++)); do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        [ -z "$pids" ] && break
        sleep 0.05
      done
      [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
    fi
    ip netns del "$ns" 2>/dev/null || true
  done
  if [ -d "$LAB_RUN_DIR/$name" ]; then rm -rf "${LAB_RUN_DIR:?}/$name"; fi
}

# Tear-down on every exit path of `run`, `demo`, `selftest`.
CLEANUP_NAMES=()
CHILD=
cleanup() {
  local rc=$? n i
  set +e        # nothing may stop the tear-down half-way (not even a failed log line)
  trap - EXIT INT TERM HUP PIPE
  trap '' PIPE  # a closed stdout (e.g. `lab.sh demo | head`) must not stop the tear-down
  if [ -n "$CHILD" ] && kill -0 "$CHILD" 2>/dev/null; then
    kill -TERM "$CHILD" 2>/dev/null
    for ((i = 0; i < 40; i++)); do kill -0 "$CHILD" 2>/dev/null || break; sleep 0.05; done
    kill -KILL "$CHILD" 2>/dev/null
  fi
  for n in "${CLEANUP_NAMES[@]}"; do
    if [ "${KEEP:-0}" = 1 ] && [ "$rc" = 0 ]; then
      log "kept $n (lab.sh down $n)"
    else
      lab_down "$n"
    fi
  done
  exit "$rc"
}
# Every way out runs cleanup: normal exit, errors (set -e), Ctrl-C, TERM, hang-up, and a reader
# that went away (SIGPIPE would otherwise kill bash without running the EXIT trap).
trap_cleanup() {
  trap cleanup EXIT
  trap 'exit 130' INT; trap 'exit 143' TERM; trap 'exit 129' HUP; trap 'exit 141' PIPE
}

up_registered() { # lab_up, registered for tear-down first (so a half-built lab goes too)
  OWNER_PID=$$  # this lab dies with this process; `down stale` removes it if that was SIGKILLed
  NAME=$(new_name)
  CLEANUP_NAMES+=("$NAME")
  lab_up "$NAME"
}

export_env() { # DIR/env -> exported variables
  local k v
  while IFS='=' read -r k v; do export "$k=$v"; done <"$1"
}

# ---------------------------------------------------------------------------------- demo
build_n4() {
  if [ -n "${LAB_N4:-}" ]; then N4=$(realpath "$LAB_N4"); [ -x "$N4" ] || die "LAB_N4=$N4 is not executable"; return; fi
  command -v cargo >/dev/null || die "cargo not found (install Rust, or set LAB_N4=/path/to/n4)"
  log "building n4 (cargo build --release -p n4-mio --bin n4)"
  (cd "$REPO" && cargo build --release -p n4-mio --bin n4 >&2) || die "cargo build failed"
  local target=${CARGO_TARGET_DIR:-$REPO/target}
  N4=$target/release/n4
  [ -x "$N4" ] || die "no binary at $N4"
}

nc_line() { grep -o '> nc -u -p [0-9]* [0-9.]* [0-9]*' "$1" | tail -n1; }

cmd_demo() {
  parse_opts "$@"
  need_root; ensure_tools
  build_n4
  trap_cleanup
  up_registered
  local S=$NAME-server HA=$NAME-host-a HB=$NAME-host-b
  local srv=$DIR/server.log ca=$DIR/client-a.log cb=$DIR/client-b.log
  local ip_b=$IP_B
  if [ "$ONE_NAT" = 1 ]; then
    ip_b=$IP_B_ONE_NAT
    echo "== lab $NAME: server $IP_SERVER, host-a and host-b both behind nat-a $IP_NAT_A ($NAT_A$([ "$HAIRPIN" = 1 ] && echo ", hairpinning"))," \
      "one-way delay ${DELAY_MS} ms, load $LOAD_A flows/s"
  else
    echo "== lab $NAME: server $IP_SERVER, nat-a $IP_NAT_A ($NAT_A), nat-b $IP_NAT_B ($NAT_B)," \
      "one-way delay ${DELAY_MS} ms, load $LOAD_A/$LOAD_B flows/s"
  fi
  echo "== [server $IP_SERVER] $N4 -s ${LAB_N4_SERVER_ARGS:-}"
  # shellcheck disable=SC2086 # word-splitting of the extra args is the point
  nsx "$S" "$N4" -s ${LAB_N4_SERVER_ARGS:-} >"$srv" 2>&1 &
  local spid=$!
  local i
  for ((i = 0; i < 50; i++)); do
    nsx "$S" ss -Hltn 'sport = :1721' | grep -q . && break
    sleep 0.1
  done
  echo "== [host-a $IP_A] n4 -c -h $IP_SERVER -b 30000 ${LAB_N4_CLIENT_ARGS:-}"
  echo "== [host-b $ip_b] n4 -c -h $IP_SERVER -b 31000 ${LAB_N4_CLIENT_ARGS:-}"
  local t0=$SECONDS
  # shellcheck disable=SC2086
  nsx "$HA" "$N4" -c -h $IP_SERVER -b 30000 ${LAB_N4_CLIENT_ARGS:-} >"$ca" 2>&1 &
  local apid=$!
  # shellcheck disable=SC2086
  nsx "$HB" "$N4" -c -h $IP_SERVER -b 31000 ${LAB_N4_CLIENT_ARGS:-} >"$cb" 2>&1 &
  local bpid=$!
  # Until both logs show [ WIN ], 60 s pass, or a client exits without WIN (then the other
  # cannot win either).
  local ok=0 wa wb
  while [ $((SECONDS - t0)) -lt 60 ]; do
    wa=0 wb=0
    grep -q '\[ WIN \]' "$ca" && wa=1
    grep -q '\[ WIN \]' "$cb" && wb=1
    if [ $wa = 1 ] && [ $wb = 1 ]; then ok=1; break; fi
    if { [ $wa = 0 ] && ! kill -0 $apid 2>/dev/null; } || { [ $wb = 0 ] && ! kill -0 $bpid 2>/dev/null; }; then
      sleep 0.2  # a last look: the log may trail the exit
      grep -q '\[ WIN \]' "$ca" && grep -q '\[ WIN \]' "$cb" && ok=1
      break
    fi
    sleep 0.1
  done
  echo "== host-a log"; sed 's/^/  a| /' "$ca"
  echo "== host-b log"; sed 's/^/  b| /' "$cb"
  if [ $ok = 0 ]; then
    echo "== server log"; sed 's/^/  s| /' "$srv"
    die "no [ WIN ] on both sides ($((SECONDS - t0)) s; a client exits without WIN, or 60 s pass)"
  fi
  local la lb
  la=$(nc_line "$ca") lb=$(nc_line "$cb")
  [ -n "$la" ] && [ -n "$lb" ] || die "no '> nc -u -p …' line in a client log"
  echo "== both sides: [ WIN ] (seen $((SECONDS - t0)) s after the clients started)"
  # The clients exit after WIN (v1 default); wait for them so their local ports are free.
  for ((i = 0; i < 100; i++)); do
    kill -0 $apid 2>/dev/null || kill -0 $bpid 2>/dev/null || break
    sleep 0.1
  done
  kill $apid $bpid 2>/dev/null || true
  set -- $la; local a_local=$5 a_ip=$6 a_port=$7
  set -- $lb; local b_local=$5 b_ip=$6 b_port=$7
  echo "== through the hole: host-a :$a_local -> $a_ip:$a_port, host-b :$b_local -> $b_ip:$b_port"
  nsx "$HB" "$PY" "$LAB_HOME/n4-lab-udp.py" line --answer --bind "$b_local" \
    --to "$b_ip:$b_port" --text "hello A, this is B (via the hole)" --timeout 10 >"$DIR/line-b.log" 2>&1 &
  local lpid=$!
  sleep 0.3
  local rc=0
  nsx "$HA" "$PY" "$LAB_HOME/n4-lab-udp.py" line --bind "$a_local" \
    --to "$a_ip:$a_port" --text "hello B, this is A (via the hole)" --timeout 8 >"$DIR/line-a.log" 2>&1 || rc=1
  wait $lpid || rc=1
  sed 's/^/  host-a| /' "$DIR/line-a.log"
  sed 's/^/  host-b| /' "$DIR/line-b.log"
  kill $spid 2>/dev/null || true
  [ $rc = 0 ] || die "the line did not cross the hole both ways"
  if [ "$ONE_NAT" = 1 ]; then
    echo "== demo OK: punched between two hosts behind one $NAT_A NAT; a line crossed each way"
  else
    echo "== demo OK: punched through two $NAT_A/$NAT_B NATs; a line crossed each way"
  fi
}

# ---------------------------------------------------------------------------------- commands
cmd_up() {
  parse_opts "$@"
  need_root; ensure_tools
  NAME=$(new_name)
  # The lab outlives `up`, unless `up` fails half-way: then it goes.
  trap 'rc=$?; set +e; trap "" PIPE; [ $rc = 0 ] || lab_down "$NAME"; exit $rc' EXIT
  trap 'exit 130' INT; trap 'exit 143' TERM; trap 'exit 129' HUP; trap 'exit 141' PIPE
  lab_up "$NAME"
  cat "$DIR/env"
}

cmd_run() {
  parse_opts "$@"
  [ ${#REST[@]} -gt 0 ] || die "usage: lab.sh run [OPTIONS] -- CMD..."
  need_root; ensure_tools
  trap_cleanup
  up_registered
  export_env "$DIR/env"
  # In the background + `wait`, so that a TERM/INT to lab.sh is handled at once (bash defers
  # traps while a foreground child runs); stdin stays the caller's.  cleanup() stops CHILD.
  local rc=0
  "${REST[@]}" <&0 &
  CHILD=$!
  wait "$CHILD" || rc=$?
  CHILD=
  exit $rc
}

cmd_exec() {
  local name
  if [ $# -ge 1 ] && [ -n "${LAB_NAME:-}" ] && { case " $ROLES a b " in *" $1 "*) true ;; *) false ;; esac; }; then
    name=$LAB_NAME
  else
    name=$(resolve_name "${1:-}"); shift
  fi
  [ $# -ge 2 ] || die "usage: lab.sh exec [NAME] ROLE CMD..."
  local ns; ns=$(ns_of "$name" "$1"); shift
  [ -e "/run/netns/$ns" ] || die "no namespace $ns"
  [ -f "$LAB_RUN_DIR/$name/env" ] && export_env "$LAB_RUN_DIR/$name/env"
  exec ip netns exec "$ns" "$@"
}

cmd_down() {
  need_root
  [ $# -ge 1 ] || die "usage: lab.sh down NAME|ENVFILE|stale|all"
  local n owner
  if [ "$1" = all ]; then
    for n in $(cmd_list); do log "down $n"; lab_down "$n"; done
    return
  fi
  if [ "$1" = stale ]; then
    # Labs of a `run`/`demo` whose lab.sh is gone (SIGKILL leaves them behind).  Labs made by
    # `up` have no owner process and are left alone.
    for n in $(cmd_list); do
      owner=$(sed -n 's/^LAB_OWNER_PID=//p' "$LAB_RUN_DIR/$n/env" 2>/dev/null || true)
      if [ -n "$owner" ] && ! kill -0 "$owner" 2>/dev/null; then
        log "down $n (stale)"; lab_down "$n"
      elif [ ! -e "$LAB_RUN_DIR/$n" ]; then
        # No state dir: a lab.sh killed half-way through `up`, or one from a removed /run.
        owner=$((16#${n#n4l-} >> 8))
        kill -0 "$owner" 2>/dev/null || { log "down $n (stale, no state)"; lab_down "$n"; }
      fi
    done
    return
  fi
  lab_down "$(resolve_name "$1")"
}

cmd_list() {
  ip netns list | awk '{print $1}' | sed -n 's/^\(n4l-[0-9a-z]*\)-server$/\1/p'
}

main() {
  local cmd=${1:-help}; [ $# -gt 0 ] && shift
  case $cmd in
    up) cmd_up "$@" ;;
    down) cmd_down "$@" ;;
    exec) cmd_exec "$@" ;;
    run) cmd_run "$@" ;;
    demo) cmd_demo "$@" ;;
    selftest) exec "$LAB_HOME/selftest.sh" "$@" ;;
    list) cmd_list ;;
    help|-h|--help) usage ;;
    *) usage >&2; exit 2 ;;
  esac
}

main "$@"
