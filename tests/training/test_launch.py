"""training/launch.py: a 2-node SLURM job and a torchrun launch resolved from environment variables alone,
without launching anything."""

import os

import pytest

from protein_llava.training.config import compose_train_config, to_train_config
from protein_llava.training.launch import resolve_launch

# What `srun` sets in the task with global rank 9 of `sbatch --nodes=2 --ntasks-per-node=8` (README, scale-out).
SLURM_TASK_9 = {
    "SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8", "SLURM_NNODES": "2", "SLURM_JOB_NAME": "protein-llava",
    "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "gpu[017-018]", "SLURM_NODEID": "1", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
}
TORCHRUN_RANK_9 = {
    "TORCHELASTIC_RUN_ID": "protein-llava", "WORLD_SIZE": "16", "RANK": "9", "LOCAL_RANK": "1", "GROUP_RANK": "1",
    "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "gpu017", "MASTER_PORT": "29500",
}


@pytest.fixture
def clean_environment(monkeypatch):
    """No cluster variables during the test, and the environment exactly as it was afterwards: Lightning's
    SLURM environment writes MASTER_ADDR into os.environ, which would send later multi-process tests of this
    worker to a node that does not exist."""
    saved = dict(os.environ)
    for name in list(os.environ):
        if name.startswith(("SLURM_", "TORCHELASTIC_")) or name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(name)
    yield monkeypatch
    monkeypatch.undo()
    os.environ.clear()
    os.environ.update(saved)


def fsdp_trainer(nodes: int, devices):
    overrides = ["stage=2", "model=tiny", "trainer=fsdp", f"trainer.num_nodes={nodes}", f"trainer.devices={devices}"]
    return to_train_config(compose_train_config(overrides)).trainer


def test_a_two_node_slurm_job_resolves_to_its_ranks(clean_environment):
    for name, value in SLURM_TASK_9.items():
        clean_environment.setenv(name, value)
    trainer = fsdp_trainer(2, 8)
    launch = resolve_launch(trainer.devices, trainer.num_nodes)
    assert (launch.cluster, launch.num_nodes, launch.processes_per_node, launch.world_size) == ("slurm", 2, 8, 16)
    assert (launch.node_rank, launch.global_rank, launch.local_rank) == (1, 9, 1)
    # Every task finds the same rendezvous: the first node of the list, and a port from the job id (Lightning:
    # 15000 + its last four digits).
    assert launch.main_address == "gpu017" and launch.main_port == 19242
    assert "rank 9 (node 1, local 1)" in launch.describe()
    # devices=auto takes the job's tasks per node.
    assert resolve_launch("auto", 2).processes_per_node == 8
    with pytest.raises(ValueError, match=r"trainer.devices=4: set trainer.devices=8"):
        resolve_launch(4, 2)
    with pytest.raises(ValueError, match="not a multiple of trainer.num_nodes=3"):
        resolve_launch(8, 3)


def test_a_torchrun_launch_resolves_to_its_ranks(clean_environment):
    for name, value in TORCHRUN_RANK_9.items():
        clean_environment.setenv(name, value)
    launch = resolve_launch(8, 2)
    assert (launch.cluster, launch.world_size, launch.node_rank, launch.global_rank, launch.local_rank) == ("torchrun", 16, 1, 9, 1)
    assert (launch.main_address, launch.main_port) == ("gpu017", 29500)


def test_without_a_cluster_it_is_local(clean_environment):
    launch = resolve_launch(2, 1)
    assert (launch.cluster, launch.world_size, launch.global_rank) == ("local", 2, 0)
