"""Checkpoint files: atomic writes, the stage-1 projector file, and the resume / export helpers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from safetensors.torch import load_file, save_file

from ..model.configuration import ProjectorConfig
from ..files import atomic_write
from ..model.modeling import ProteinLLM

PROJECTOR_FILE = "projector.safetensors"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temp file, flushed to disk and renamed into place."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options}")
        for key, value in checkpoint.get("state_dict", {}).items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise FloatingPointError(f"refusing to save a checkpoint with non-finite weights in {key}")
        atomic_write(Path(path), lambda tmp: torch.save(checkpoint, tmp))


def projector_metadata(model: ProteinLLM) -> dict[str, str]:
    return config_projector_metadata(model.config)


def config_projector_metadata(config) -> dict[str, str]:
    """What a projector file records about the model it belongs to (from a ProteinLLMConfig alone)."""
    return {
        "projector_config": json.dumps(config.projector_config.to_dict(), sort_keys=True),
        "encoder_dim": str(config.encoder_config.embed_dim),
        "text_dim": str(config.text_config.hidden_size),
        "encoder_layers": str(config.encoder_config.num_layers),
        "decoder": str(getattr(config.text_config, "_name_or_path", "") or config.text_config.model_type),
    }


def save_projector(model: ProteinLLM, path: Path) -> None:
    """The projector's weights as their own small safetensors file, with the shapes it was trained for."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.projector.state_dict().items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=projector_metadata(model)))


def load_projector(model: ProteinLLM, path: Path) -> None:
    """Load a stage-1 projector into `model`, refusing one trained for other encoder/decoder shapes."""
    check_projector_file(path, model.config)
    model.projector.load_state_dict(load_file(str(path)))


def check_projector_file(path: Path, config) -> None:
    """Refuse (naming the file and the differing field) a projector trained for other shapes; reads metadata only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"stage 2 needs stage 1's projector at {path}: run `python train.py stage=1` with the same model "
            f"first, or point stage2.projector=PATH at a projector.safetensors"
        )
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
    wanted = config_projector_metadata(config)
    for key in ("encoder_dim", "text_dim", "projector_config"):
        if metadata.get(key) != wanted[key]:
            found = metadata.get(key)
            if key == "projector_config" and found is not None:
                found_cfg, wanted_cfg = ProjectorConfig(**_strip(json.loads(found))), config.projector_config
                found_dict, wanted_dict = found_cfg.to_dict(), wanted_cfg.to_dict()
                # output_scale is the RMS gain's initial value, not a shape, and the file's learned gain replaces
                # it. Measured from the decoder at build (when the preset leaves it null), it also differs in
                # its last bits with the thread count that summed it: comparing it refused stage 1's projector
                # in a stage 2 run with OMP_NUM_THREADS=1.
                found_dict.pop("output_scale", None)
                wanted_dict.pop("output_scale", None)
                if found_dict == wanted_dict:
                    continue
            raise ValueError(
                f"the projector at {path} was trained for {key}={found} but this model has {key}={wanted[key]}; "
                "train stage 1 for this model, or pick the matching projector"
            )


def _strip(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}


SHARDED_CHECKPOINT_DONE = "meta.pt"  # Lightning's ModelParallelStrategy writes it last, on rank 0, after every shard


def newest_checkpoint(folder: Path) -> Path | None:
    """The newest complete Lightning checkpoint under `folder`, by modification time: a file (written
    atomically), or (FSDP) a folder of shards. A folder without its `meta.pt` was cut short by a kill during
    the save (sharded saves bypass the atomic write) and is passed over."""
    candidates = [p for p in Path(folder).glob("*.ckpt") if p.is_file() or (p / SHARDED_CHECKPOINT_DONE).is_file()]
    candidates = sorted(candidates, key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def resolve_resume(resume: str | None, lightning_dir: Path) -> str | None:
    """`resume`: None (fresh run), "auto" (newest checkpoint in the run folder, if any) or a checkpoint path."""
    if resume in (None, "", "none", "null"):
        return None
    if resume == "auto":
        newest = newest_checkpoint(lightning_dir)
        return str(newest) if newest is not None else None
    if not Path(resume).exists():
        raise FileNotFoundError(f"resume={resume}: no such checkpoint file or sharded checkpoint folder")
    return str(resume)


def random_states() -> dict:
    """This process's random generators (torch CPU and CUDA, Python, NumPy): what draws dropout masks and
    anything else sampled while training. The data order has its own seeded generators (data/batching.py)."""
    # Tensors and plain Python values only, so checkpoints still load with torch.load(weights_only=True).
    kind, keys, position, has_gauss, cached = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached))
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()  # this process's device: ranks may see other device counts
    return states


def restore_random_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
