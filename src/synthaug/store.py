"""The synthetic store: generated images in the ImageFolder / Hugging Face `imagefolder`
layout, `train/<class>/<id>.png`, with one `train/metadata.jsonl` row per image (file_name,
label, class, group, seed, generator fingerprint, recipe, conditioning, scores).

Writes are atomic (temp file + rename; a metadata row is appended only after its image is
in place), so an interrupted generation leaves no corrupt file, and `fill` generates only
the rows that are missing. Parallel workers (generate/executors.py) each append to their
own shard file, `train/metadata-<shard>.jsonl`; the rows of every shard file count as
written, and the next `fill` (or `merge_shards`) folds them into metadata.jsonl.

A store is a folder synthaug made: it holds a `.synthaug-store` marker, and synthaug writes
into (and deletes from) no other folder. Every path a metadata row names stays under the
store. A re-run finds a corrupt or missing image and a bad metadata line, says so, and
regenerates exactly those rows (each from its own seed)."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data.dataset import ImageDataset
from .errors import SynthaugError
from .utils.io import exclusive, marked, temp_for, write_marker
from .utils.paths import check_folder, check_name, inside, make_folders, remove_created
from .utils.runtime import progress_bar

SPLIT = "train"
MARKER = ".synthaug-store"
# provenance a row records only away from its former value (`generate.cache.sampling_provenance`): a row
# without it was made at that value, and a run at another value may not take the row, nor the reverse
RECORDED_AWAY_FROM = {"group_guidance_scale": None, "ensemble": 1}


def _given_folder(path, key: str) -> Path | None:
    """`path` as a folder that is there to check (None: unset or not there yet); a file, or a
    folder under one, or a link is refused."""
    if check_folder(path, key) is None or not (Path(path).exists() or Path(path).is_symlink()):
        return None
    if Path(path).is_symlink():
        raise SynthaugError(f"{key} '{path}' is a link: give the folder itself")
    return Path(path)


def check_store_folder(path, key: str = "store_dir"):
    """Refuse a folder that synthaug may not write into as a store: a file, a link, or a
    folder that holds something and is not a store synthaug made (one with the marker, or
    one of an older synthaug: every metadata line a synthaug row). Writes nothing."""
    root = _given_folder(path, key)
    if root is None:
        return
    split = root / SPLIT  # a store's repair deletes unlisted images and rewrites metadata: never through a link
    for part in [split, *(split.glob("metadata*.jsonl") if split.is_dir() and not split.is_symlink() else ())]:
        if part.is_symlink():
            raise SynthaugError(f"{key} '{root}' holds a link, '{part.relative_to(root)}': synthaug writes only in "
                                "folders it made; remove the link or give a new folder")
    if not any(root.iterdir()) or is_store(root):
        return
    raise SynthaugError(f"{key} '{root}' is not empty and is not a synthaug store (no {MARKER}): "
                        "give a new or empty folder")


def check_stores_folder(path, key: str = "store_dir"):
    """Refuse a folder that synthaug may not write stores into, one per subfolder (DPT's, one per
    generator): a file, a link, or a folder that holds anything but synthaug stores. Writes nothing."""
    root = _given_folder(path, key)
    if root is None:
        return
    strangers = [p.name for p in sorted(root.iterdir()) if p.is_symlink() or not is_store(p)]
    if strangers:
        raise SynthaugError(f"{key} '{root}' holds '{strangers[0]}', which is not a synthaug store (no {MARKER}): give a "
                            "new or empty folder, or one that holds only synthaug stores")


def is_store(root: str | os.PathLike) -> bool:
    """Whether `root` is a store synthaug made (its marker, or an older synthaug's rows); a
    Hugging Face imagefolder of the user's own images, train/metadata.jsonl too, is not."""
    root = Path(root)
    return root.is_dir() and (marked(root, MARKER) or _older_store(root))


def _older_store(root: Path) -> bool:
    """A store written before stores had a marker: metadata.jsonl whose every line is a row
    synthaug writes (a Hugging Face imagefolder of the user's own images is not one)."""
    meta = root / SPLIT / "metadata.jsonl"
    if not meta.is_file() or meta.is_symlink():
        return False
    store = SyntheticStore(root, [])
    lines = [line for line in meta.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return bool(lines) and all(store._parse(line) is not None for line in lines)


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
        try:
            return [line for f in files for line in f.read_text(encoding="utf-8", errors="replace").splitlines()]
        except OSError as e:
            raise SynthaugError(f"cannot read the store's metadata '{e.filename}' ({e.strerror or e}): it should be a "
                                "file synthaug wrote; move it away or give another store folder") from None

    def _parse(self, line: str) -> dict | None:
        """A metadata line as a row, or None if it is not one: not JSON (e.g. cut off by a
        crash), no usable id, class or file name, or a file name that leaves the store."""
        try:
            row = json.loads(line)
            check_name(row["id"], "store row id")
            if not isinstance(row["class"], str) or row["file_name"] != f"{class_folder(row['class'])}/{row['id']}.png":
                return None  # synthaug names every image <class folder>/<id>.png
        except (json.JSONDecodeError, KeyError, TypeError, SynthaugError):
            return None
        return row

    def rows(self) -> list[dict]:
        """Metadata rows whose image is present (metadata.jsonl, then the shard files; a row
        written twice counts once). Lines that are not rows are skipped (see `problems`)."""
        rows, seen = [], set()
        for line in self._lines():
            row = self._parse(line)
            if row is None or row["id"] in seen:
                continue
            if self._own(self.split_dir / row["file_name"]):
                rows.append(row)
                seen.add(row["id"])
        return rows

    def problems(self) -> dict[str, list[str]]:
        """What is wrong with the store, by kind: `bad_lines` (metadata lines that are not
        rows), `missing` (rows whose image is gone), `corrupt` (images that do not decode),
        `unlisted` (images without a row). Empty lists when all is well."""
        out = {"bad_lines": [], "missing": [], "corrupt": [], "unlisted": []}
        if not self.split_dir.is_dir():
            return out
        listed, shapes = set(), {}
        for n, line in enumerate(self._lines(), 1):
            row = self._parse(line) if line.strip() else None
            if row is None:
                if line.strip():
                    out["bad_lines"].append(f"line {n}")
                continue
            path = self.split_dir / row["file_name"]
            listed.add(row["file_name"])
            if not self._own(path):
                out["missing"].append(row["file_name"])
            else:
                shapes[row["file_name"]] = _shape(path)
        # an image that does not decode, or decodes to another mode or size than most of the store's
        common = Counter(v for v in shapes.values() if v is not None).most_common(1)
        out["corrupt"] = [rel for rel, shape in shapes.items() if shape is None or (common and shape != common[0][0])]
        out["unlisted"] = sorted(rel for rel in self._pngs() if rel not in listed)
        return out

    def _own(self, path: Path) -> bool:
        """A regular file in a class folder of this store (no link leads elsewhere)."""
        return path.is_file() and not path.is_symlink() and not path.parent.is_symlink() and \
            path.parent.parent == self.split_dir

    def _pngs(self) -> list[str]:
        return [str(p.relative_to(self.split_dir)) for p in self.split_dir.glob("*/*.png") if self._own(p)]

    def done_ids(self) -> set[str]:
        return {r["id"] for r in self.rows()}

    def verify(self):
        """Raise (one line) if the store is damaged (see `problems`), a row leaves the store, or
        a row's class is not one of `classes`."""
        if not self.split_dir.exists():
            return
        self.check_rows()
        found = {kind: items for kind, items in self.problems().items() if items}
        if found:
            summary = ", ".join(f"{len(v)} {k.replace('_', ' ')} (e.g. {v[0]})" for k, v in found.items())
            raise SynthaugError(f"synthetic store '{self.root}' is damaged: {summary}; run the command that made it "
                                "again: it regenerates exactly those images")

    def check_rows(self):
        """Raise (one line) if a row leaves the store or its class is not one of `classes` (a store
        of other data): checked before a run writes, where damage is for the run to repair."""
        if not self.split_dir.is_dir():
            return
        for n, line in enumerate(self._lines(), 1):
            try:
                row = json.loads(line)
                file_name = row.get("file_name")
            except (json.JSONDecodeError, AttributeError):
                continue
            if isinstance(file_name, str) and "\0" not in file_name:
                inside(self.split_dir, file_name, f"{self.metadata_file} line {n}: file_name")
            if self._parse(line) is not None and self.classes and row["class"] not in self.classes:
                raise SynthaugError(f"{self.metadata_file} line {n} has unknown class {row['class']!r}: "
                                    "this store belongs to other data; use another folder")

    def load(self, ids: Sequence[str] | None = None) -> ImageDataset:
        """The store as a dataset in metadata order, or only the rows in `ids` in their order
        (not the order they were written in, which a repair, a resumed job or another plan
        sharing the store changes), with `info['rows']` holding the metadata."""
        rows = self.rows()
        if ids is not None:
            by_id = {r["id"]: r for r in rows}
            rows = [by_id[i] for i in dict.fromkeys(ids) if i in by_id]
        images = []
        for r in rows:
            try:
                with Image.open(self.split_dir / r["file_name"]) as img:
                    array = np.array(img)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                raise SynthaugError(f"image '{self.split_dir / r['file_name']}' in the synthetic store is corrupt: run the "
                                    "command that made it again: it regenerates exactly the damaged images") from None
            images.append(torch.from_numpy(array).reshape(array.shape[0], array.shape[1], -1).permute(2, 0, 1))
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
             provenance: dict | None = None, progress: bool = False, shard: str | None = None) -> int:
        """Generate and write every plan row not yet in the store. A plan row has `id`,
        `label`, `seed` and optional `group`, `conditioning`, ...; `make_images(rows)`
        returns uint8 images for them. Returns the number of images written.

        `shard`: a parallel worker's name. Its rows go to its own shard file, and the store
        is not repaired first (other workers are writing; the driver repairs before and
        merges after)."""
        ids = [check_name(r["id"], "plan row id") for r in plan]
        if len(set(ids)) != len(ids):
            raise ValueError("plan row ids must be unique")
        for r in plan:
            if not 0 <= int(r["label"]) < len(self.classes):
                raise ValueError(f"plan row '{r['id']}' has label {r['label']}, not one of {len(self.classes)} classes")
        if shard is None:
            self.claim()
            self._repair_metadata()
        else:
            check_name(shard, "shard name")
            self.split_dir.mkdir(parents=True, exist_ok=True)
        metadata_file = self.metadata_file if shard is None else self.split_dir / f"metadata-{shard}.jsonl"
        existing = self.check_made(plan, provenance or {})
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
                        record = self._write_image(row, image, provenance or {})
                        meta.write(json.dumps(record) + "\n")
                        meta.flush()
                    os.fsync(meta.fileno())
                written += len(rows)
                bar.advance(task, len(rows))
        return written

    def check_made(self, plan: list[dict], provenance: dict) -> dict[str, dict]:
        """Raise (one line) where the store holds a plan row's id made another way: a stored row is
        reused only if the plan row's own fields (label, seed, source, strength, ...) and `provenance`
        (generator, sampler, ...) match it, where it records them. Returns the stored rows by id.
        Reads only: a recipe's check calls it with the provenance known before the generator exists."""
        existing = {r["id"]: r for r in self.rows()}
        for r in plan:
            made = existing.get(r["id"])
            if made is None:
                continue
            for key, value in {**r, **RECORDED_AWAY_FROM, **provenance}.items():
                recorded = made.get(key, RECORDED_AWAY_FROM.get(key, value))  # unrecorded: its former value, else any
                if json.loads(json.dumps(value)) != recorded:
                    raise SynthaugError(f"store '{self.root}' holds '{r['id']}' made with {key} {recorded}, not {value}: "
                                        f"use another store folder for this {key}")
        return existing

    def set_scores(self, scores: dict[str, dict]):
        """Merge per-image scores (`{id: {"utility_r1": 0.8, ...}}`) into the rows' `scores`
        and rewrite metadata.jsonl atomically. Ids the store does not hold are an error. Runs that
        share the store (parallel bench cells) take turns, so none loses another's scores."""
        with exclusive(self.split_dir / ".metadata.lock"):
            self._set_scores(scores)

    def _set_scores(self, scores: dict[str, dict]):
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

    def _write_image(self, row: dict, image: torch.Tensor, provenance: dict) -> dict:
        name = self.classes[int(row["label"])]
        rel = f"{class_folder(name)}/{row['id']}.png"
        path = inside(self.split_dir, rel, "image path")
        path.parent.mkdir(parents=True, exist_ok=True)
        array = image.permute(1, 2, 0).numpy()
        tmp = temp_for(path)
        with open(tmp, "wb") as f:
            Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(f, format="PNG")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return {"file_name": rel, "class": name, **{k: v for k, v in row.items()}, **provenance}

    def claim(self):
        """Make the store folder (with its marker) or check that it is one synthaug made; a
        store written by an older synthaug (metadata.jsonl, no marker) gets the marker."""
        check_store_folder(self.root, f"store '{self.root}'")
        created = make_folders(self.split_dir, "the synthetic store")
        try:
            if not marked(self.root, MARKER):
                write_marker(self.root / MARKER, "a synthetic image store made by synthaug\n")
        except OSError as e:
            remove_created(created)
            raise SynthaugError(f"cannot write to the synthetic store '{self.root}' ({e.strerror}): choose a folder "
                                "you can write to") from None

    def repair(self):
        """Make metadata and files agree (see `_repair_metadata`). Only when no worker is writing."""
        self.claim()
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
        tmp = temp_for(self.metadata_file)
        with open(tmp, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.metadata_file)

    def _repair_metadata(self):
        """Rewrite metadata.jsonl (with the shard files merged in) without bad lines or rows
        whose image is missing or corrupt, and delete corrupt images, images that have no row
        and leftover temp files, so that `fill` regenerates exactly those rows. Says on
        stderr what it repaired (images without a row, left by a kill, go quietly)."""
        if not self.split_dir.exists():
            return
        for tmp in self.split_dir.glob("*/.*.tmp"):
            if self._own(tmp):
                tmp.unlink()
        found = self.problems()
        for rel in found["corrupt"]:
            (self.split_dir / rel).unlink()
        rows = self.rows()
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if not self.metadata_file.exists() or self.metadata_file.read_text(encoding="utf-8", errors="replace") != text:
            self._rewrite(rows)
        for f in self.shard_files():
            f.unlink()
        listed = {r["file_name"] for r in rows}
        for rel in self._pngs():
            if rel not in listed:
                (self.split_dir / rel).unlink()
        damage = {k: len(v) for k, v in found.items() if v and k != "unlisted"}
        if damage:
            said = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in damage.items())
            print(f"synthetic store '{self.root}': {said}; regenerating the rows they held", file=sys.stderr)


def _ends_mid_line(path: Path) -> bool:
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def class_folder(name: str) -> str:
    """The store folder of a class: its name with every character but letters, digits, '-',
    '_' and '.' replaced by '_', never empty, '.', '..' or hidden."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    return safe if safe and not safe.startswith(".") else f"_{safe}"


def _shape(path: Path) -> tuple | None:
    """The image's (mode, size) if it decodes, else None."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.mode, img.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
