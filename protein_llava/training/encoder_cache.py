"""An on-disk cache of frozen-encoder representations: compute ESM-2 once, reuse across epochs and runs.

Layout: `folder/<identity>/shard-00000.safetensors ...` plus `index.json` (sequence hash → shard). The
identity hashes the encoder's config, its representation layer and its weights, so a changed encoder or
layer lands in a new folder and never reads stale features. Shards are fp16 by default and memory-mapped
when read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..model.encoder import ProteinEncoder, esm2_alphabet
from ..files import atomic_write


def sequence_key(residues: str) -> str:
    return hashlib.sha256(residues.encode()).hexdigest()[:32]


def encoder_identity(encoder: ProteinEncoder) -> str:
    """A hash of what decides the representations: config, representation layer and every weight."""
    digest = hashlib.sha256()
    digest.update(json.dumps(encoder.config.to_dict(), sort_keys=True, default=str).encode())
    digest.update(str(encoder.repr_layer).encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


class RepresentationCache:
    """Frozen-encoder features by sequence. Build with `add`, read with `features` / `batch`.

    Args:
        folder: where caches live (one subfolder per encoder identity).
        encoder: the frozen encoder whose features are cached.
        dtype: storage dtype (fp16 halves disk and I/O; fp32 reproduces the online path bit for bit).
        shard_size: proteins per shard file.
    """

    def __init__(self, folder: str | Path, encoder: ProteinEncoder, dtype: torch.dtype = torch.float16, shard_size: int = 2048):
        self.encoder = encoder
        self.dtype = dtype
        self.shard_size = shard_size
        self.identity = encoder_identity(encoder)
        self.folder = Path(folder) / self.identity
        self.folder.mkdir(parents=True, exist_ok=True)
        self.index: dict[str, str] = self._read_index()
        self._handles: dict[str, object] = {}

    def _read_index(self) -> dict[str, str]:
        path = self.folder / "index.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def __contains__(self, residues: str) -> bool:
        return sequence_key(residues) in self.index

    def __len__(self) -> int:
        return len(self.index)

    @torch.no_grad()
    def add(self, sequences: Iterable[str], batch_size: int = 8, device: torch.device | str = "cpu") -> int:
        """Compute and store the features of every sequence not yet cached; returns how many were added."""
        import fcntl

        with open(self.folder / ".lock", "w") as lock:
            # Several processes (DDP ranks, parallel runs) may fill one cache: one writes at a time.
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.index = self._read_index()
            return self._add_locked(sequences, batch_size, device)

    def _add_locked(self, sequences: Iterable[str], batch_size: int, device) -> int:
        missing = sorted({s for s in sequences if s not in self}, key=len)  # similar lengths batch together
        alphabet = esm2_alphabet()
        encoder = self.encoder.to(device).eval()
        shard_number = len({v for v in self.index.values()})
        for shard_start in range(0, len(missing), self.shard_size):
            shard = missing[shard_start : shard_start + self.shard_size]
            tensors = {}
            for start in range(0, len(shard), batch_size):
                chunk = shard[start : start + batch_size]
                longest = max(len(s) for s in chunk)
                tokens = torch.full((len(chunk), longest + 2), alphabet.padding_idx, dtype=torch.long)
                for row, residues in enumerate(chunk):
                    ids = [alphabet.cls_idx, *(alphabet.tok_to_idx[r] for r in residues), alphabet.eos_idx]
                    tokens[row, : len(ids)] = torch.tensor(ids)
                features, _ = encoder(tokens.to(device))  # (n, longest, D)
                for row, residues in enumerate(chunk):
                    tensors[sequence_key(residues)] = features[row, : len(residues)].to("cpu", self.dtype).contiguous()
            name = f"shard-{shard_number:05d}.safetensors"
            atomic_write(self.folder / name, lambda tmp, t=tensors: save_file(t, tmp))
            self.index.update({key: name for key in tensors})
            # The index is written after its shard, so a crash never points at a missing file.
            atomic_write(self.folder / "index.json", lambda tmp: Path(tmp).write_text(json.dumps(self.index)))
            shard_number += 1
        return len(missing)

    def features(self, residues: str) -> torch.Tensor:
        """(length, D) features of one cached sequence; KeyError naming it if it was never added."""
        key = sequence_key(residues)
        if key not in self.index:
            raise KeyError(f"protein {residues[:20]}... (length {len(residues)}) is not in the cache {self.folder}")
        name = self.index[key]
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.folder / name), framework="pt")
        return self._handles[name].get_tensor(key)

    def batch(self, proteins: Sequence[str]) -> dict[str, torch.Tensor]:
        """`protein_representations` (N, longest, D) and their mask, as `ProteinLLM.forward` takes them."""
        rows = [self.features(p) for p in proteins]
        longest = max(r.shape[0] for r in rows)
        out = torch.zeros(len(rows), longest, rows[0].shape[1], dtype=self.dtype)
        mask = torch.zeros(len(rows), longest, dtype=torch.bool)
        for i, row in enumerate(rows):
            out[i, : row.shape[0]] = row
            mask[i, : row.shape[0]] = True
        return {"protein_representations": out, "protein_representations_mask": mask}

    def __getstate__(self):
        # Open file handles don't pickle (DataLoader workers, DDP spawn): reopen lazily on the other side.
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state
