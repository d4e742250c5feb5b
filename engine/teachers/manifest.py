"""A teacher store's manifest: how shards are named in it, and what of it can be checked without the shards.

A shard is identified by its absolute path (a remote one by its URL): its part folder is
``parts/<file name>-<8 hex digits of that path's sha256>``, so shards of one file name in two folders are two parts.
A training shard is matched to the part built from the same path, else (the data moved, or is read through
``pipe:`` or ``http://``) to the part whose shard's path ends the same way, at least in its file name.

The manifest's ``digest`` detects accidents, not edits: a manifest edited and re-digested is still checked for
what can be checked: every field's type, a logit scale a CLIP model can have, part names that are their shards',
counts that add up, and (``teacher_scale_problem``) the logit scale of each teacher checkpoint when that file is
still there.

A store holds one teacher or an ensemble of several (format 5): ``teachers`` lists the members in order, each with
its model, pretrained weights, fingerprint, logit scale, logit bias and width, and every row holds the members'
embeddings side by side (width = the sum of theirs, each member's slice L2-normalised on its own). That is
DataCompDR's layout of ``image_emb``/``text_emb``, so one lookup serves every member (one index, one key and digest
check, one read of adjacent bytes per sample), a DataCompDR export writes the rows as they are, and a single-teacher
store is simply the one-member case of the same format.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch

from ..core.errors import StoreError
from ..core.io import atomic_write_json
from ..data.shards import is_remote
from . import reinforced

# 3: parts named by the shard's full path (2 named them by file name alone); 4: (count, V, D) images and (count, C, D)
# texts, and a reinforced store's views (engine.teachers.reinforced); 5: ``teachers``, a list of members whose rows
# lie side by side along the last axis (a teacher ensemble; one member for one teacher)
FORMAT_VERSION = 5
MEMBER_FIELDS = ("model", "pretrained", "fingerprint", "logit_scale", "logit_bias", "embed_dim")
PART_ARRAYS = ("keys", "key_hashes", "digests", "image", "text")
# CLIP clamps its learned logit scale at 100; SigLIP does not (its trained scales are about 110-120), so a teacher's
# scale is sane up to well above that, and an edited one (doubled, negative, NaN) is caught by the other checks
MAX_LOGIT_SCALE = 1000.0
REBUILD = "restore it or rebuild the store with engine.precompute (into a new --teacher-store)"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def teacher_fingerprint(model: str, pretrained: Optional[str]) -> str:
    """Identifies a teacher: ``model`` + the sha256 of a checkpoint file, or + the open_clip tag."""
    if pretrained and os.path.isfile(pretrained):
        return f"{model}:sha256={sha256_file(pretrained)[:16]}"
    return f"{model}:tag={pretrained}"


# ----------------------------------------------------------------------------------------------- shard identity


def shard_source(url: str) -> str:
    """What identifies a shard: its absolute path, or its URL."""
    return url if is_remote(url) else os.path.abspath(url)


def part_name(url: str) -> str:
    """The part folder of a shard: its file name (readable) and a hash of its full path (unique)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(url).name.rsplit(".", 1)[0]).lstrip(".") or "shard"
    return f"{stem}-{hashlib.sha256(shard_source(url).encode()).hexdigest()[:8]}"


def _common_tail(a: str, b: str) -> int:
    """How many trailing path components two paths or URLs share."""
    shared = 0
    for x, y in zip(reversed(a.split("/")), reversed(b.split("/"))):
        if x != y:
            break
        shared += 1
    return shared


def match_parts(parts: dict, urls: list[str]) -> list[Optional[str]]:
    """The part of each shard (None: none): the part built from the same path or URL, else the unclaimed part whose
    shard's path shares the longest tail with it (at least the file name). A tie, or a shard listed twice, is a
    StoreError."""
    sources = [shard_source(url) for url in urls]
    by_source = {record["shard"]: name for name, record in parts.items()}
    matched = [by_source.get(source) for source in sources]
    seen: set[str] = set()
    for url, source in zip(urls, sources):
        if source in seen:
            raise StoreError(f"shard {url} is listed twice in the training data; every sample key must be unique")
        seen.add(source)
    by_file = defaultdict(list)  # unclaimed parts by their shard's file name
    for name in sorted(set(parts) - set(matched)):
        by_file[Path(parts[name]["shard"]).name].append(name)
    for i, url in enumerate(urls):
        if matched[i] is None and by_file[Path(url).name]:
            matched[i] = _closest(url, by_file[Path(url).name], parts)
    return matched


def _closest(url: str, candidates: list[str], parts: dict) -> str:
    """The candidate part whose shard's path ends most like ``url`` (claimed: removed from ``candidates``)."""
    tails = [_common_tail(url, parts[name]["shard"]) for name in candidates]
    best = max(tails)
    if tails.count(best) > 1:
        tied = [parts[name]["shard"] for name, tail in zip(candidates, tails) if tail == best][:2]
        raise StoreError(f"shard {url} matches the parts of shards {tied[0]} and {tied[1]} equally; pass the shards "
                         f"by the paths the store was built from")
    return candidates.pop(tails.index(best))


# -------------------------------------------------------------------------------------------- reading, writing


def write_manifest(root: Path, manifest: dict) -> None:
    manifest["digest"] = content_digest(manifest)
    atomic_write_json(Path(root) / "manifest.json", manifest, "store manifest", sort_keys=True)


def content_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_manifest(root: str | os.PathLike) -> dict:
    """The manifest of a store, refused (StoreError naming the file) if missing, unreadable, old, edited or not
    what a store can hold."""
    path = Path(root) / "manifest.json"
    if Path(root).is_file():
        raise StoreError(f"{root}: is a file; a teacher store is a directory with a manifest.json")
    if not path.exists():
        raise StoreError(f"no teacher store at {root} (manifest.json missing); build it with "
                         f"`python -m engine.precompute --teacher-store {root} ...`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path}: not valid JSON ({exc}): the file is damaged or truncated; {REBUILD}") from exc
    except OSError as exc:  # a directory in its place, or unreadable
        raise StoreError(f"{path}: cannot read it ({exc.strerror}); {REBUILD}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise StoreError(f"{path}: store format {found} is not {FORMAT_VERSION} (a store of an older version or a "
                         f"foreign one); delete {root} and rebuild it with engine.precompute")
    if manifest.get("digest") != content_digest(manifest):
        raise StoreError(f"{path}: content does not match its digest (the file was edited or damaged); {REBUILD}")
    problem = manifest_problem(manifest)
    if problem:
        raise StoreError(f"{path}: {problem} (the file was edited); {REBUILD}")
    return manifest


def _count(value) -> bool:
    return type(value) is int and value >= 0


def member_problem(index: int, member) -> Optional[str]:
    """What a ``teachers`` entry holds that no build writes, else None (``index`` counts from 0)."""
    where = f"teachers[{index}]"
    if not isinstance(member, dict) or set(member) != set(MEMBER_FIELDS):
        return f"{where} {member!r} is not a record of {', '.join(MEMBER_FIELDS)}"
    if not all(isinstance(member[k], str) for k in ("model", "pretrained", "fingerprint")):
        return f"{where}: model, pretrained and fingerprint are not strings"
    scale = member["logit_scale"]
    if type(scale) not in (int, float) or not 0 < scale <= MAX_LOGIT_SCALE:  # NaN fails both comparisons
        return (f"{where}: logit_scale {scale!r} is not a teacher's logit scale (a finite number in "
                f"(0, {MAX_LOGIT_SCALE:g}])")
    bias = member["logit_bias"]
    if bias is not None and (type(bias) not in (int, float) or not math.isfinite(bias)):
        return f"{where}: logit_bias {bias!r} is not a SigLIP teacher's logit bias (a finite number, or null)"
    if not _count(member["embed_dim"]) or member["embed_dim"] == 0:
        return f"{where}: embed_dim {member['embed_dim']!r} is not a positive integer"
    return None


def manifest_problem(manifest: dict) -> Optional[str]:
    """What a manifest holds that no build writes, else None."""
    members = manifest.get("teachers")
    if not isinstance(members, list) or not members:
        return f"teachers {members!r} is not a non-empty list of teacher records"
    problem = next(filter(None, (member_problem(i, member) for i, member in enumerate(members))), None)
    if problem:
        return problem
    width = manifest.get("embed_dim")
    if not _count(width) or width != sum(member["embed_dim"] for member in members):
        return f"embed_dim {width!r} is not the sum of its teachers' widths {member_dims(manifest)}"
    if (manifest.get("dtype"), manifest.get("normalized")) != ("float16", True):
        return "the embeddings are not recorded as L2-normalised float16"
    problem = reinforced.record_problem(manifest.get("augmentation"))
    if problem:
        return problem
    parts = manifest.get("parts")
    if not isinstance(parts, dict):
        return "parts is not a mapping of part names to records"
    arrays = PART_ARRAYS + (reinforced.VIEW_ARRAYS if manifest["augmentation"]["views"] else ())
    problem = next(filter(None, (_record_problem(name, record, arrays) for name, record in parts.items())), None)
    if problem:
        return problem
    total = sum(record["count"] for record in parts.values())
    if manifest.get("count") != total:
        return f"count {manifest.get('count')!r} is not the sum of its parts' counts ({total})"
    if not isinstance(manifest.get("complete"), bool):
        return f"complete {manifest.get('complete')!r} is not true or false"
    return None


def _record_problem(name: str, record, arrays: tuple[str, ...]) -> Optional[str]:
    if not isinstance(record, dict) or not isinstance(record.get("shard"), str):
        return f"part {name!r} does not record the shard it was built from"
    if name != part_name(record["shard"]):
        return f"part {name!r} is not the part of shard {record['shard']} ({part_name(record['shard'])})"
    if not _count(record.get("count")) or not (record.get("shard_bytes") is None or _count(record["shard_bytes"])):
        return f"part {name}: count or shard_bytes is not a non-negative integer"
    sums = record.get("sha256")
    if not isinstance(sums, dict) or not all(isinstance(sums.get(array), str) for array in arrays):
        return f"part {name}: sha256 does not record every part file ({', '.join(arrays)})"
    return None


def checkpoint_logit_scale(path: str) -> Optional[float]:
    """The exponentiated ``logit_scale`` of a teacher checkpoint file (open_clip's or an engine checkpoint), None
    when it holds none or cannot be read here."""
    try:
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 (torch raises many types; the build loaded it, so this check only gives up)
        return None
    weights = content.get("state_dict", content) if isinstance(content, dict) else {}
    value = next((v for k, v in weights.items() if k.removeprefix("module.") == "logit_scale"), None)
    return float(value.float().exp()) if torch.is_tensor(value) else None


def member_dims(manifest: dict) -> list[int]:
    """The members' widths, in their order along the rows' last axis."""
    return [member["embed_dim"] for member in manifest["teachers"]]


def member_fingerprints(manifest: dict) -> list[str]:
    return [member["fingerprint"] for member in manifest["teachers"]]


def teachers_mismatch(stored: list[str], wanted: list[str]) -> Optional[str]:
    """What differs between the teachers a store was built by and the ones a run asks for (fingerprints in order):
    their count, their order, or the first member that differs; None when they are the same."""
    if stored == wanted:
        return None
    if len(stored) != len(wanted):
        return f"it holds {len(stored)} teacher(s) {stored}, this run asks for {len(wanted)} {wanted}"
    if sorted(stored) == sorted(wanted):
        return f"it holds the same teachers in another order ({stored}; this run asks for {wanted})"
    k = next(i for i, (a, b) in enumerate(zip(stored, wanted)) if a != b)
    return f"its teacher {k + 1} is {stored[k]}, this run's is {wanted[k]}"


def teacher_scale_problem(manifest: dict) -> Optional[str]:
    """Each member's logit scale in the manifest against its checkpoint's, where the checkpoint the store was built
    from is still at its recorded path (same sha256); None when they agree or no file is there to compare."""
    for index, member in enumerate(manifest["teachers"]):
        path = member["pretrained"]
        if not os.path.isfile(path) or teacher_fingerprint(member["model"], path) != member["fingerprint"]:
            continue
        scale = checkpoint_logit_scale(path)
        if scale is not None and not math.isclose(scale, member["logit_scale"], rel_tol=1e-6):
            return (f"teachers[{index}]: logit_scale {member['logit_scale']:g} is not its teacher's ({scale:g}, "
                    f"from {path})")
    return None
