"""Shard snapshots (issue 15): a file is whole, versioned and checksummed or refused; a
shard restored from one holds the same conns; a worker killed with kill -9 in a pool with
snapshots comes back with its established flows, which go on as if nothing happened."""
from __future__ import annotations

import os

import numpy as np
import pytest

from shardct import Config
from shardct import profiles as P
from shardct.batch import take
from shardct.shard import LocalPool, Shard
from shardct.table import T_COUNT
from workers import snapshot as S
from workers.pool import Pool

SEED = 0x5EED


def _pool_after(tr, n_packets, n=2, **kw):
    lp = LocalPool(n, Config(max_conns=1 << 14, events=False), seed=SEED, **kw)
    lp.process(take(tr.fresh(), np.arange(min(n_packets, len(tr)))))
    return lp


def conn_keys(conns):
    return sorted((c.original, c.reply, c.state or "", "ASSURED" in c.status) for c in conns)


def test_a_restored_shard_holds_the_same_conns_and_goes_on_the_same(tmp_path):
    """Shard 1 of a LocalPool is saved to a file mid-trace and loaded into a fresh shard
    that replaces it: the conns are the same, and the rest of the trace gives the same
    verdicts and final table as the pool that kept its shard."""
    tr = P.profile("2k", 20_000, seed=4)
    half = len(tr) // 2
    ref = _pool_after(tr, half)
    other = _pool_after(tr, half)
    path = str(tmp_path / "s.snap")
    S.save(path, *other.shards[1].snapshot())
    fresh = Shard(1, 2, other.config, seed=SEED, rng=np.random.default_rng([SEED, 1]))
    restored = fresh.restore(*S.load(path))
    assert restored == other.shards[1].ct.table.count > 0, restored
    now = int(tr.batch.ts[half - 1])
    assert conn_keys(fresh.ct.conns(now)) == conn_keys(other.shards[1].ct.conns(now))
    # the restored shard's again-reservations are granted (its own entries), so the
    # round that carries them changes nothing
    other.shards[1] = fresh
    rest = take(tr.fresh(), np.arange(half, len(tr)))
    pk_a, v_a = ref.process(take(tr.fresh(), np.arange(half, len(tr))))
    pk_b, v_b = other.process(rest)
    assert np.array_equal(v_a, v_b), f"{int((v_a != v_b).sum())} verdicts differ"
    end = int(tr.batch.ts.max())
    assert conn_keys(ref.conns(end)) == conn_keys(other.conns(end))


@pytest.mark.parametrize("damage", ["flip", "cut", "magic", "format"])
def test_a_damaged_snapshot_is_refused_with_its_path(tmp_path, damage):
    lp = _pool_after(P.profile("2k", 4000, seed=5), 4000)
    path = str(tmp_path / "s.snap")
    S.save(path, *lp.shards[0].snapshot())
    data = bytearray(open(path, "rb").read())
    if damage == "flip":
        data[-100] ^= 0x40
    elif damage == "cut":
        data = data[:-7]
    elif damage == "magic":
        data[0:5] = b"junk!"
    else:
        data[15] = S.FORMAT + 1
    open(path, "wb").write(bytes(data))
    with pytest.raises(S.SnapshotError, match=str(path)):
        S.load(path)


def test_a_snapshot_of_another_shard_or_seed_is_not_restored(tmp_path):
    lp = _pool_after(P.profile("2k", 4000, seed=6), 4000)
    sc, ar = lp.shards[0].snapshot()
    other_k = Shard(1, 2, lp.config, seed=SEED)
    with pytest.raises(ValueError, match="k is 0"):
        other_k.restore(sc, ar)
    other_seed = Shard(0, 2, lp.config, seed=SEED + 1)
    with pytest.raises(ValueError, match="seed"):
        other_seed.restore(sc, ar)
    assert other_seed.ct.table.count == 0, "a refused restore changed the table"


def test_save_is_atomic_a_failed_write_leaves_the_old_file(tmp_path):
    lp = _pool_after(P.profile("2k", 4000, seed=7), 4000)
    path = str(tmp_path / "s.snap")
    sc, ar = lp.shards[0].snapshot()
    S.save(path, sc, ar)
    before = open(path, "rb").read()
    bad = dict(ar, junk=np.zeros(3, dtype=np.float64))     # not a snapshot dtype
    with pytest.raises(ValueError):
        S.save(path, sc, bad)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["s.snap"], os.listdir(tmp_path)


def _run(tr, kill_at=None, snapshot_interval=None):
    pool = Pool(2, Config(max_conns=1 << 16, events=False), seed=SEED, log=lambda *a: None,
                max_round=512, frames=False, snapshot_interval=snapshot_interval)
    state = {"rounds": 0}
    seqs = []

    def emit(pk, v):
        seqs.append(np.asarray(pk.seq).copy())
        state["rounds"] += 1
        if state["rounds"] == kill_at:
            pool.sup.procs[1].kill()

    b = tr.fresh()
    totals = pool.run([take(b, np.arange(s, min(len(b), s + 4096)))
                       for s in range(0, len(b), 4096)], emit=emit, timeout_s=300)
    return pool, totals, np.concatenate(seqs)


def test_kill_9_with_snapshots_loses_no_established_flow():
    """A worker killed mid-trace with snapshots every round: it restarts from its last
    snapshot, and every flow that was established (ASSURED) before the first packet the
    kill lost is still in the table at the end, as in the run without a kill; only the
    entries made in the rounds in flight count as lost_conns. Without snapshots the same
    kill loses the shard's flows."""
    tr = P.profile("2k", 40_000, seed=8)
    ref_pool, _, _ = _run(tr)
    pool, totals, seq = _run(tr, kill_at=40, snapshot_interval=0.0)
    assert pool.sup.restarts[1] == 1, pool.sup.restarts
    assert totals["restored_conns"] > 0 and totals["lost_packets"] > 0, totals
    assert totals["packets_out"] + totals["lost_packets"] == len(tr), totals
    lost = np.setdiff1d(np.arange(len(tr)), seq)
    # what one table had established before the first lost packet
    before = LocalPool(1, Config(max_conns=1 << 16, events=False), seed=SEED)
    before.process(take(tr.fresh(), np.arange(int(lost.min()))))
    t_kill = int(tr.batch.ts[int(lost.min()) - 1])
    established = {c.original for c in before.conns(t_kill) if "ASSURED" in c.status}
    end = int(tr.batch.ts.max())
    still = established & {c.original for c in ref_pool.conns(end)}   # not ended since
    got = {c.original for c in pool.conns(end)}
    missing = sorted(still - got)
    assert len(still) > 100 and not missing, \
        f"{len(missing)} of {len(still)} established flows lost: {missing[:3]}; {totals}"
    assert totals["lost_conns"] < totals["restored_conns"] // 10, totals
    pool0, totals0, _ = _run(tr, kill_at=40)
    missing0 = still - {c.original for c in pool0.conns(end)}
    assert len(missing0) > len(still) // 4, f"without snapshots {len(missing0)} lost"
    print(f"established flows lost: 0 of {len(still)} with snapshots, {len(missing0)} "
          f"without; totals {totals}, without {totals0}")


def test_replay_writes_a_loadable_snapshot_per_worker(tmp_path, capsys):
    """`shardct replay --workers 2 --snapshot-interval 0 --snapshot-dir D`: one snapshot
    per worker in D, each a whole file that loads, holding that shard's entries."""
    from workers.cli import main
    d = tmp_path / "snaps"
    rc = main(["replay", "--workers", "2", "--seed", "7", "--list", "0",
               "--snapshot-interval", "0", "--snapshot-dir", str(d)])
    assert rc == 0, capsys.readouterr().err
    names = sorted(os.listdir(d))
    assert names == ["shard-0.snap", "shard-1.snap"], names
    total = 0
    for k in (0, 1):
        sc, ar = S.load(str(d / f"shard-{k}.snap"))
        assert (sc["k"], sc["n"], sc["seed"]) == (k, 2, 7), sc
        total += int(ar["tbl"][T_COUNT])
    assert total > 0, "the snapshots hold no entries"


@pytest.mark.parametrize("n_new", [1, 2, 3])
def test_a_planned_restart_rehashes_every_conn_under_a_new_seed(n_new):
    """2 shards under one seed are saved mid-trace; a new pool of n_new shards under
    another seed takes every conn from those snapshots (shard.rehash), and the rest of the
    trace gives the verdicts and final table of a pool that never stopped."""
    from shardct.shard import rehash
    tr = P.profile("2k", 20_000, seed=9)
    half = len(tr) // 2
    ref = _pool_after(tr, len(tr))
    old = _pool_after(tr, half)
    snaps = [S.load_bytes(S.dump_bytes(*sh.snapshot())) for sh in old.shards]
    new = LocalPool(n_new, old.config, seed=SEED ^ 0x1234567)
    carried, dropped = rehash(snaps, new.shards)
    homes = sum(1 for c in old.conns())
    assert (carried, dropped) == (homes, 0), (carried, dropped, homes)
    assert new.shards[0].ct.table.seed != old.shards[0].ct.table.seed
    pk, v = new.process(take(tr.fresh(), np.arange(half, len(tr))))
    ref_half = LocalPool(2, old.config, seed=SEED)
    _, v_all = ref_half.process(tr.fresh())
    assert np.array_equal(v, v_all[half:]), f"{int((v != v_all[half:]).sum())} verdicts differ"
    end = int(tr.batch.ts.max())
    assert conn_keys(new.conns(end)) == conn_keys(ref.conns(end))


def test_cli_planned_restart_under_a_new_seed_and_worker_count(tmp_path, capsys):
    """`replay --snapshot-dir D` saves every shard at the end; `snapshot show D` lists
    them; `replay --restore D --workers 3` (a new random seed) starts with every conn
    rehashed (restored_conns = the entries saved); a damaged file is refused in one
    line naming it."""
    from workers.cli import main
    d = tmp_path / "end"
    assert main(["replay", "--workers", "2", "--seed", "5", "--list", "0",
                 "--snapshot-dir", str(d)]) == 0
    out = capsys.readouterr().out
    saved = int(out.split("entries=")[1].split()[0])
    assert main(["snapshot", "show", str(d)]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert len(shown) == 2 and all("seed 0x00000005" in ln for ln in shown), shown
    assert main(["replay", "--workers", "3", "--list", "0", "--restore", str(d)]) == 0
    cap = capsys.readouterr()
    assert f"restored_conns={saved} " in cap.out, cap.out
    assert "seed 0x" in cap.err, "a new seed is drawn and printed"
    p = d / "shard-1.snap"
    data = bytearray(p.read_bytes())
    data[-1] ^= 1
    p.write_bytes(bytes(data))
    rc = main(["replay", "--workers", "2", "--list", "0", "--restore", str(d)])
    err = capsys.readouterr().err
    assert rc == 2 and f"{p}: checksum mismatch" in err and "Traceback" not in err, (rc, err)
