"""Sharding over local devices (simulated CPU devices in a subprocess), ranks and GPU maps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxspec._pipeline import devices as D
from jaxspec._pipeline.batch import plan

HERE = Path(__file__).resolve().parent


def _env(**extra):
    env = dict(os.environ)
    for var in ("CUDA_VISIBLE_DEVICES", "XLA_PYTHON_CLIENT_MEM_FRACTION", "PJRT_NPROC", "NPROC"):
        env.pop(var, None)
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


def test_sharded_over_4_devices_equals_one_device():
    """4 simulated CPU devices, chunks of 7 patches (not a multiple of 4; 20 patches wrap)."""
    res = subprocess.run(
        [sys.executable, str(HERE / "_shard_worker.py"), "4", "7"],
        env=_env(PJRT_NPROC="8"), capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4
    assert out["npatch"] % out["chunk"] != 0 and out["chunk"] % 4 != 0
    r = out["results"]["4"]
    assert r["finite"]
    for name in ("flux", "ivar", "resolution", "xflux", "chi2pix", "pixmask_fraction"):
        assert r[name] <= 1e-12, (name, r[name])


def test_cpu_thread_pool_guard_names_the_fix():
    """4 CPU devices on a 2-thread pool would deadlock jaxlib's LAPACK: refused with the fix."""
    code = (
        "import jax; jax.config.update('jax_num_cpu_devices', 4)\n"
        "from jaxspec._pipeline.devices import sharded_solve_chunk\n"
        "try:\n    sharded_solve_chunk()\nexcept RuntimeError as e:\n    print('REFUSED', e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], env=_env(PJRT_NPROC="2"), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "REFUSED" in res.stdout and "PJRT_NPROC=8" in res.stdout


def test_bind_gpus_sets_visible_devices_before_jax_starts():
    """Rank 1 of 2 on a node with GPUs 4-7 takes GPUs 6,7; JAX has not started in that process."""
    code = (
        "from jaxspec._pipeline.devices import World, bind_gpus, jax_started\n"
        "import os\n"
        "w = World(rank=1, size=2, local_rank=1, local_size=2)\n"
        "print(bind_gpus(w, gpus_per_rank=2), os.environ['CUDA_VISIBLE_DEVICES'], jax_started())\n"
        "w = World(rank=3, size=4, local_rank=3, local_size=4)\n"
        "os.environ['CUDA_VISIBLE_DEVICES'] = '0,1'\n"
        "print(bind_gpus(w, device_map='0,0,1,1'), os.environ['CUDA_VISIBLE_DEVICES'],"
        " os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION'])\n"
    )
    res = subprocess.run([sys.executable, "-c", code], env=_env(CUDA_VISIBLE_DEVICES="4,5,6,7"),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "[6, 7] 6,7 False"
    assert lines[1] == "[1] 1 0.450"


@pytest.mark.parametrize(
    "local_rank, local_size, gpus, per_rank, dmap, expect",
    [
        (0, 4, [0, 1, 2, 3], None, None, ([0], 1)),  # one rank per GPU
        (3, 4, [0, 1, 2, 3], None, None, ([3], 1)),
        (1, 2, [0, 1, 2, 3], None, None, ([2, 3], 1)),  # two GPUs per rank
        (5, 8, [0, 1, 2, 3], None, None, ([1], 2)),  # two ranks per GPU
        (2, 3, [0], None, None, ([0], 3)),  # three ranks share the one GPU
        (1, 2, [0, 1, 2, 3], 1, None, ([1], 1)),
        (2, 4, [4, 5], None, [[0], [0], [1], [1]], ([5], 2)),  # an explicit map
    ],
)
def test_assign_gpus(local_rank, local_size, gpus, per_rank, dmap, expect):
    assert D.assign_gpus(local_rank, local_size, gpus, per_rank, dmap) == expect


def test_parse_device_map_and_errors():
    assert D.parse_device_map("0,0,1,1") == [[0], [0], [1], [1]]
    assert D.parse_device_map("0,1;2,3") == [[0, 1], [2, 3]]
    assert D.parse_device_map(None) is None
    with pytest.raises(ValueError, match="expected GPU numbers"):
        D.parse_device_map("a,b")
    with pytest.raises(ValueError, match="names 2 local ranks"):
        D.assign_gpus(2, 3, [0, 1], device_map=[[0], [1]])


def test_launcher_detection_and_serial_world():
    assert not D.launched_by_mpi({})
    assert not D.launched_by_mpi({"OMPI_COMM_WORLD_SIZE": "1"})
    assert D.launched_by_mpi({"OMPI_COMM_WORLD_SIZE": "2"})
    assert D.launched_by_mpi({"PMI_SIZE": "8"})
    assert D.launched_by_mpi({"SLURM_NTASKS": "4"})
    w = D.world("off")
    assert (w.rank, w.size, w.serial, w.root) == (0, 1, True, True)
    with pytest.raises(ValueError, match="mode"):
        D.world("maybe")


def test_split_fibers_whole_bundles():
    parts = [D.split_fibers(100, 500, 25, p, 3) for p in range(3)]
    assert parts == [(100, 175), (275, 175), (450, 150)]
    assert sum(n for _, n in parts) == 500
    assert D.split_fibers(0, 25, 25, 1, 2) == (0, 0)  # more ranks than bundles: nothing


def test_plan_rounds_and_split_last_round():
    """5 frames on 2 ranks: 2 rounds of whole frames, then frame 4 split over both ranks."""
    units = plan([0, 1, 2, 3, 4], 2)
    assert [u.index for u in units[0]] == [0, 2, 4] and [u.index for u in units[1]] == [1, 3, 4]
    assert all(u.nparts == 1 and u.root == r for r in range(2) for u in units[r][:2])
    last = [units[0][2], units[1][2]]
    assert [(u.part, u.nparts, u.root) for u in last] == [(0, 2, 0), (1, 2, 0)]
    # 2 frames on 5 ranks: ranks 0,2,4 share frame a, ranks 1,3 frame b; each frame extracted once
    units = plan([7, 9], 5)
    got = {(u.index, u.part) for us in units for u in us}
    assert got == {(7, 0), (7, 1), (7, 2), (9, 0), (9, 1)}
    assert {u.root for us in units for u in us if u.index == 9} == {1}
    assert all(len(us) == 1 for us in units)
    assert plan([], 3) == [[], [], []]


def test_gather_parts_serial_comm_passes_through():
    """gather_parts on a 1-rank communicator returns the rank's own arrays."""
    mpi = pytest.importorskip("mpi4py.MPI")
    pytest.importorskip("mpi4jax")
    a = {"flux": np.arange(6.0).reshape(2, 3), "wave": np.arange(3.0)}
    ok, err, out = D.gather_parts(mpi.COMM_SELF, True, None, a, 0, 2)
    assert ok and err is None
    np.testing.assert_array_equal(out["flux"], a["flux"])
    ok, err, out = D.gather_parts(mpi.COMM_SELF, False, "boom", None, 0, 2)
    assert (ok, err, out) == (False, "boom", None)
