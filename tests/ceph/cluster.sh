#!/usr/bin/env bash
# A throw-away single-node Ceph cluster for the RBD tests and benchmark:
# one monitor, one manager and one OSD on a memory store, on loopback,
# with real cephx keys, started directly (no systemd) from the Debian
# packages' binaries.
#
#   tests/ceph/cluster.sh start   # idempotent; prints `BLOCKGRAPH_CEPH_CONF=<path>`
#   tests/ceph/cluster.sh stop    # kills the daemons and removes the directory
#   tests/ceph/cluster.sh status  # exit 0 when the cluster answers
#
# The directory is $BLOCKGRAPH_CEPH_DIR (default /tmp/blockgraph-ceph). It
# holds ceph.conf, the client.admin keyring (`keyring`), the logs and a pool
# `rbd` initialised for RBD images. When the machine cannot run it (no
# Ceph binaries, a daemon that will not start), `start` prints a loud line
# beginning with `CEPH UNAVAILABLE:` that names the reason and exits 2.
set -uo pipefail

DIR=${BLOCKGRAPH_CEPH_DIR:-/tmp/blockgraph-ceph}
CONF=$DIR/ceph.conf
# A port of its own, away from Ceph's default 6789/3300, so that a Ceph
# already on the machine is not disturbed.
MON_PORT=${BLOCKGRAPH_CEPH_MON_PORT:-16789}

unavailable() {
  echo "CEPH UNAVAILABLE: $*" >&2
  # Leave no half-started daemons behind; the logs stay for a look.
  kill_daemons
  exit 2
}

ceph_cmd() {
  timeout 30 ceph -c "$CONF" --connect-timeout 10 "$@"
}

is_up() {
  [ -f "$DIR/ready" ] && ceph_cmd health >/dev/null 2>&1
}

kill_daemons() {
  for pidfile in "$DIR"/run/*.pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile" 2>/dev/null)
    [ -n "$pid" ] && kill "$pid" 2>/dev/null
  done
  # Give them a moment, then make sure.
  sleep 1
  for pidfile in "$DIR"/run/*.pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile" 2>/dev/null)
    [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null
    rm -f "$pidfile"
  done
}

stop() {
  kill_daemons
  rm -rf "$DIR"
}

start() {
  if is_up; then
    echo "BLOCKGRAPH_CEPH_CONF=$CONF"
    return 0
  fi
  for bin in ceph ceph-mon ceph-mgr ceph-osd ceph-authtool monmaptool rbd; do
    command -v "$bin" >/dev/null 2>&1 \
      || unavailable "'$bin' is not installed (apt-get install ceph-mon ceph-osd ceph-mgr ceph-common)"
  done
  # A half-started cluster from an earlier run: start afresh.
  stop
  mkdir -p "$DIR"/run "$DIR"/log "$DIR"/mon/ceph-a "$DIR"/mgr/ceph-x "$DIR"/osd/ceph-0 \
    || unavailable "cannot create $DIR"

  local fsid
  fsid=$(cat /proc/sys/kernel/random/uuid)
  cat >"$CONF" <<EOF
[global]
fsid = $fsid
mon host = v1:127.0.0.1:$MON_PORT
mon initial members = a
public network = 127.0.0.0/8
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $DIR/keyring
run dir = $DIR/run
admin socket = $DIR/run/\$name.asok
pid file = $DIR/run/\$name.pid
log file = $DIR/log/\$name.log
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 1
mgr initial modules =
[mon]
mon data = $DIR/mon/\$cluster-\$id
keyring = $DIR/mon/\$cluster-\$id/keyring
[mgr]
mgr data = $DIR/mgr/\$cluster-\$id
keyring = $DIR/mgr/\$cluster-\$id/keyring
[osd]
osd data = $DIR/osd/\$cluster-\$id
keyring = $DIR/osd/\$cluster-\$id/keyring
osd objectstore = memstore
memstore device bytes = ${BLOCKGRAPH_CEPH_MEMSTORE_BYTES:-4294967296}
osd max object name len = 256
osd max object namespace len = 64
EOF

  # Keys: the monitors' own, and the client.admin key every tool uses.
  ceph-authtool --create-keyring "$DIR/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null \
    || unavailable "ceph-authtool failed"
  ceph-authtool --create-keyring "$DIR/keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null \
    || unavailable "ceph-authtool failed"
  ceph-authtool "$DIR/mon.keyring" --import-keyring "$DIR/keyring" >/dev/null \
    || unavailable "ceph-authtool failed"
  monmaptool --create --addv a "[v1:127.0.0.1:$MON_PORT]" --fsid "$fsid" "$DIR/monmap" >/dev/null \
    || unavailable "monmaptool failed"

  # Monitor.
  ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/mon.keyring" \
    >"$DIR/log/mkfs-mon.out" 2>&1 || unavailable "ceph-mon --mkfs failed: $(tail -3 "$DIR/log/mkfs-mon.out")"
  ceph-mon -c "$CONF" -i a >"$DIR/log/mon.out" 2>&1 \
    || unavailable "ceph-mon did not start: $(tail -3 "$DIR/log/mon.out")"
  local i
  for i in $(seq 60); do
    ceph_cmd mon stat >/dev/null 2>&1 && break
    sleep 0.5
  done
  ceph_cmd mon stat >/dev/null 2>&1 || unavailable "the monitor does not answer (see $DIR/log/mon.a.log)"
  # Without this, a monitor with msgr2 off keeps a health warning only.
  ceph_cmd config set mon auth_allow_insecure_global_id_reclaim false >/dev/null 2>&1

  # Manager (`rbd` and pool stats ask it; the cluster works without it but warns).
  ceph_cmd auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
    -o "$DIR/mgr/ceph-x/keyring" >/dev/null 2>&1 || unavailable "cannot create the manager's key"
  ceph-mgr -c "$CONF" -i x >"$DIR/log/mgr.out" 2>&1 \
    || unavailable "ceph-mgr did not start: $(tail -3 "$DIR/log/mgr.out")"

  # OSD on a memory store.
  local osd_uuid id
  osd_uuid=$(cat /proc/sys/kernel/random/uuid)
  id=$(ceph_cmd osd new "$osd_uuid" 2>/dev/null) || unavailable "'ceph osd new' failed"
  mkdir -p "$DIR/osd/ceph-$id"
  ceph_cmd auth get-or-create "osd.$id" osd 'allow *' mon 'allow profile osd' mgr 'allow profile osd' \
    -o "$DIR/osd/ceph-$id/keyring" >/dev/null 2>&1 || unavailable "cannot create the OSD's key"
  ceph-osd -c "$CONF" -i "$id" --mkfs --osd-uuid "$osd_uuid" >"$DIR/log/mkfs-osd.out" 2>&1 \
    || unavailable "ceph-osd --mkfs failed: $(tail -3 "$DIR/log/mkfs-osd.out")"
  ceph-osd -c "$CONF" -i "$id" >"$DIR/log/osd.out" 2>&1 \
    || unavailable "ceph-osd did not start: $(tail -3 "$DIR/log/osd.out")"
  for i in $(seq 120); do
    ceph_cmd osd stat 2>/dev/null | grep -q '1 up' && break
    sleep 0.5
  done
  ceph_cmd osd stat 2>/dev/null | grep -q '1 up' \
    || unavailable "the OSD did not come up (see $DIR/log/osd.$id.log)"

  # The pool the tests use.
  ceph_cmd osd pool create rbd 8 8 >/dev/null 2>&1 || unavailable "cannot create pool 'rbd'"
  ceph_cmd osd pool set rbd size 1 --yes-i-really-mean-it >/dev/null 2>&1
  timeout 60 rbd -c "$CONF" pool init rbd >/dev/null 2>&1 || unavailable "'rbd pool init' failed"
  # A pool-wide write succeeds only once its placement groups are active.
  for i in $(seq 120); do
    timeout 10 rbd -c "$CONF" ls rbd >/dev/null 2>&1 && break
    sleep 0.5
  done
  timeout 10 rbd -c "$CONF" ls rbd >/dev/null 2>&1 || unavailable "pool 'rbd' does not answer"
  touch "$DIR/ready"
  echo "BLOCKGRAPH_CEPH_CONF=$CONF"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) is_up ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 64
    ;;
esac
