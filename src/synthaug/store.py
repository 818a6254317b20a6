"""The synthetic store: generated images in the ImageFolder / Hugging Face `imagefolder`
layout, `train/<class>/<id>.png`, with one `train/metadata.jsonl` row per image (file_name,
label, class, group, seed, generator fingerprint, recipe, conditioning, scores).

Writes are atomic (temp file + rename; a metadata row is appended only after its image is
in place), so an interrupted generation leaves no corrupt file, and `fill` generates only
the rows that are missing. Parallel workers (generate/executors.py) each append to their
own shard file, `train/metadata-<shard>.jsonl`; the rows of every shard file count as
written, and the next `fill` (or `merge_shards`) folds them into metadata.jsonl."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data.dataset import ImageDataset
from .errors import SynthaugError
from .utils.runtime import progress_bar

SPLIT = "train"


class SyntheticStore:
    def __init__(self, root: str | os.PathLike, classes: Sequence[str]):
        self.root = Path(root)
        self.classes = list(classes)
        self.split_dir = self.root / SPLIT
        self.metadata_file = self.split_dir / "metadata.jsonl"

    # ------------------------------------------------------------------ reading
    def shard_files(self) -> list[Path]:
        return sorted(self.split_dir.glob("metadata-*.jsonl"))

    def _lines(self) -> list[str]:
        files = ([self.metadata_file] if self.metadata_file.exists() else []) + self.shard_files()
        return [line for f in files for line in f.read_text().splitlines()]

    def rows(self) -> list[dict]:
        """Metadata rows whose image is present (metadata.jsonl, then the shard files; a row
        written twice counts once). A last line cut off by a crash is ignored."""
        rows, seen = [], set()
        for line in self._lines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a row cut off mid-write; its image will be regenerated
            if row["id"] in seen:
                continue
            if (self.split_dir / row["file_name"]).exists():
                rows.append(row)
                seen.add(row["id"])
        return rows

    def done_ids(self) -> set[str]:
        return {r["id"] for r in self.rows()}

    def verify(self):
        """Raise if metadata and files disagree (a row without its image, an image without a
        row, a class the store does not know)."""
        if not self.split_dir.exists():
            return
        listed = set()
        if self.metadata_file.exists() or self.shard_files():
            for n, line in enumerate(self._lines(), 1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise SynthaugError(f"{self.metadata_file} line {n} is not JSON: run the generation again to repair it") from None
                if row.get("class") not in self.classes:
                    raise SynthaugError(f"{self.metadata_file} line {n} has unknown class {row.get('class')!r}: "
                                        "this store belongs to other data; use another folder")
                if not (self.split_dir / row["file_name"]).exists():
                    raise SynthaugError(f"store row '{row['id']}' points to missing {row['file_name']}: "
                                        "run the generation again to fill it")
                listed.add(row["file_name"])
        on_disk = {str(p.relative_to(self.split_dir)) for p in self.split_dir.glob("*/*.png")}
        extra = sorted(on_disk - listed)
        if extra:
            raise SynthaugError(f"{len(extra)} image(s) in {self.split_dir} have no metadata row (e.g. {extra[0]}): "
                                "run the generation again to repair the store")

    def load(self, ids: Sequence[str] | None = None) -> ImageDataset:
        """The store (or only the rows in `ids`) as a dataset in metadata order, with
        `info['rows']` holding the metadata."""
        rows = self.rows()
        if ids is not None:
            wanted = set(ids)
            rows = [r for r in rows if r["id"] in wanted]
        images = []
        for r in rows:
            with Image.open(self.split_dir / r["file_name"]) as img:
                images.append(torch.from_numpy(np.array(img)).reshape(img.size[1], img.size[0], -1).permute(2, 0, 1))
        if not rows:
            raise SynthaugError(f"synthetic store '{self.root}' is empty: generate first")
        labels = torch.tensor([self.classes.index(r["class"]) for r in rows])
        groups = None
        if all(r.get("group") is not None for r in rows):
            groups = torch.tensor([r["group"] for r in rows])
        return ImageDataset(torch.stack(images).contiguous(), labels, self.classes, groups=groups,
                            name=str(self.root), info={"rows": rows})

    # ------------------------------------------------------------------ writing
    def fill(self, plan: list[dict], make_images: Callable[[list[dict]], torch.Tensor], *, batch_size: int = 64,
             extra: dict | None = None, progress: bool = False, shard: str | None = None) -> int:
        """Generate and write every plan row not yet in the store. A plan row has `id`,
        `label`, `seed` and optional `group`, `conditioning`, ...; `make_images(rows)`
        returns uint8 images for them. Returns the number of images written.

        `shard`: a parallel worker's name. Its rows go to its own shard file, and the store
        is not repaired first (other workers are writing; the driver repairs before and
        merges after)."""
        ids = [r["id"] for r in plan]
        if len(set(ids)) != len(ids):
            raise ValueError("plan row ids must be unique")
        self.split_dir.mkdir(parents=True, exist_ok=True)
        if shard is None:
            self._repair_metadata()
        elif not shard.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"shard names are letters, digits, '-' and '_', got {shard!r}")
        metadata_file = self.metadata_file if shard is None else self.split_dir / f"metadata-{shard}.jsonl"
        existing = {r["id"]: r for r in self.rows()}
        # a stored row is reused only if it was made the same way: the plan row's own fields (label,
        # seed, source, strength, ...) and `extra` (generator, sampler, ...) must match
        for r in plan:
            made = existing.get(r["id"])
            if made is None:
                continue
            for key, value in [*r.items(), *(extra or {}).items()]:
                if key in made and json.loads(json.dumps(value)) != made[key]:
                    raise SynthaugError(f"store '{self.root}' holds '{r['id']}' made with {key} {made[key]}, not {value}: "
                                        f"use another store folder for this {key}")
        todo = [r for r in plan if r["id"] not in existing]
        written = 0
        with progress_bar(progress) as bar:
            task = bar.add_task("generate", total=len(plan), completed=len(plan) - len(todo), info="")
            for i in range(0, len(todo), batch_size):
                rows = todo[i : i + batch_size]
                images = make_images(rows)
                cut_off = _ends_mid_line(metadata_file)  # a crash's half line must not swallow the next row
                with metadata_file.open("a") as meta:
                    if cut_off:
                        meta.write("\n")
                    for row, image in zip(rows, images):
                        record = self._write_image(row, image, extra or {})
                        meta.write(json.dumps(record) + "\n")
                        meta.flush()
                    os.fsync(meta.fileno())
                written += len(rows)
                bar.advance(task, len(rows))
        return written

    def set_scores(self, scores: dict[str, dict]):
        """Merge per-image scores (`{id: {"utility_r1": 0.8, ...}}`) into the rows' `scores`
        and rewrite metadata.jsonl atomically. Ids the store does not hold are an error."""
        rows = self.rows()
        known = {r["id"] for r in rows}
        missing = [i for i in scores if i not in known]
        if missing:
            raise SynthaugError(f"store '{self.root}' has no image '{missing[0]}' to score: generate it first")
        for r in rows:
            if r["id"] in scores:
                r["scores"] = {**(r.get("scores") or {}), **scores[r["id"]]}
        self._rewrite(rows)
        for f in self.shard_files():
            f.unlink()

    def _write_image(self, row: dict, image: torch.Tensor, extra: dict) -> dict:
        name = self.classes[int(row["label"])]
        rel = f"{_safe(name)}/{row['id']}.png"
        path = self.split_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        array = image.permute(1, 2, 0).numpy()
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(f, format="PNG")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return {"file_name": rel, "class": name, **{k: v for k, v in row.items()}, **extra}

    def repair(self):
        """Make metadata and files agree (see `_repair_metadata`). Only when no worker is writing."""
        self.split_dir.mkdir(parents=True, exist_ok=True)
        self._repair_metadata()

    def merge_shards(self):
        """Fold the shard files into metadata.jsonl (atomically) and delete them. Only when
        no worker is writing."""
        shards = self.shard_files()
        if shards:
            self._rewrite(self.rows())
            for f in shards:
                f.unlink()

    def _rewrite(self, rows: list[dict]):
        tmp = self.metadata_file.with_name(".metadata.jsonl.tmp")
        with open(tmp, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.metadata_file)

    def _repair_metadata(self):
        """Rewrite metadata.jsonl (with the shard files merged in) without cut-off lines or
        rows whose image is missing, and delete images that have no row and leftover temp
        files (they are regenerated)."""
        if not self.split_dir.exists():
            return
        for tmp in self.split_dir.glob("*/.*.tmp"):
            tmp.unlink()
        rows = self.rows()
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if not self.metadata_file.exists() or self.metadata_file.read_text() != text:
            self._rewrite(rows)
        for f in self.shard_files():
            f.unlink()
        listed = {r["file_name"] for r in rows}
        for p in self.split_dir.glob("*/*.png"):
            if str(p.relative_to(self.split_dir)) not in listed:
                p.unlink()


def _ends_mid_line(path: Path) -> bool:
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def _safe(name: str) -> str:
    """A class name usable as a folder name."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
