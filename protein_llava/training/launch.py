"""Which processes a run is made of: this process's place in a SLURM (`srun`) or torchrun launch, read through
Lightning's own cluster environments, and checked against `trainer.devices` × `trainer.num_nodes` before any
model loads (a mismatch otherwise surfaces as a hang or a late error in the first collective).

`train()` logs the result; tests resolve a fake 2-node SLURM job from environment variables alone.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchSettings:
    """This process in its launch. cluster: "slurm", "torchrun" or "local" (Lightning starts the processes
    of one machine itself)."""

    cluster: str
    num_nodes: int
    processes_per_node: int
    world_size: int
    node_rank: int
    global_rank: int
    local_rank: int
    main_address: str
    main_port: int

    def describe(self) -> str:
        return (
            f"{self.cluster} launch: {self.num_nodes} node(s) x {self.processes_per_node} process(es) = {self.world_size}; "
            f"this is rank {self.global_rank} (node {self.node_rank}, local {self.local_rank}); "
            f"rendezvous {self.main_address}:{self.main_port}"
        )


def resolve_launch(devices, num_nodes: int) -> LaunchSettings:
    """This process's launch settings; ValueError when the cluster's process count and the trainer's
    `devices` × `num_nodes` disagree. `devices`: a count, a list of device ids, or "auto" (the cluster's)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if SLURMEnvironment.detect():
        cluster, environment = "slurm", SLURMEnvironment()
    elif TorchElasticEnvironment.detect():
        cluster, environment = "torchrun", TorchElasticEnvironment()
    else:
        # Lightning starts this machine's processes itself and picks the rendezvous port then.
        per_node = len(devices) if isinstance(devices, (list, tuple)) else devices if isinstance(devices, int) else 1
        return LaunchSettings("local", num_nodes, per_node, per_node * num_nodes, 0, 0, 0, "127.0.0.1", 0)
    world = environment.world_size()
    if world % num_nodes:
        raise ValueError(f"the {cluster} launch has {world} processes, not a multiple of trainer.num_nodes={num_nodes}")
    per_node = world // num_nodes
    wanted = len(devices) if isinstance(devices, (list, tuple)) else devices
    if wanted != "auto" and wanted != per_node:
        raise ValueError(
            f"the {cluster} launch has {world} processes over trainer.num_nodes={num_nodes} nodes ({per_node} per node), "
            f"but trainer.devices={wanted}: set trainer.devices={per_node} (or auto), or launch {wanted} tasks per node"
        )
    if cluster == "slurm":
        environment.validate_settings(num_devices=per_node, num_nodes=num_nodes)  # Lightning's own --ntasks-per-node check
    return LaunchSettings(
        cluster, num_nodes, per_node, world, environment.node_rank(), environment.global_rank(),
        environment.local_rank(), environment.main_address, environment.main_port,
    )
