"""`geodino curate action=stats|embed|balance|retrieve|dedup ...`: data curation on the command line.

Orchestration only: band statistics come from geodino.data.stats; embeddings and the embed output format from
geodino.data.curation.embed, clustering from .kmeans, balanced sampling from .sampling, retrieval and deduplication
from .search; the backbone from geodino.models, item lists from geodino.data.lists. Outputs go to ``out=`` (default
``outputs/curate/<action>/<time>``):

- ``stats``: ``band_stats.json`` (next to the data, or ``out=``), for ``data.stats_file=``;
- ``embed``: ``embeddings.npy`` (memmap), ``items.txt`` (a chip or file list) and ``embed.json``; for chips (raster
  sources, chip stores) also ``chips.parquet``, their footprints as GeoParquet (with geopandas installed);
- ``balance`` / ``retrieve`` / ``dedup``: a chip or file list of the selection (``data.chip_list=`` /
  ``data.file_list=``), its row indices and a JSON summary.

Every output is named before any work and refused when it exists (unless ``overwrite=true``) or would overwrite an
input (the data, the embeddings or queries read, the weights); files are written atomically, and a failed command
removes the output folder it created (geodino.outputs).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from geodino.data.curation.embed import (
    CHIP_KINDS,
    EMBEDDINGS_FILE,
    FOOTPRINTS_FILE,
    ITEMS_FILE,
    META_FILE,
    embed_source,
    load_embeddings,
    write_embed_meta,
    write_footprints,
)
from geodino.data.curation.kmeans import hierarchical_kmeans
from geodino.data.curation.sampling import balanced_sample
from geodino.data.curation.search import deduplicate, retrieve
from geodino.data.lists import write_chip_list, write_file_list
from geodino.data.sources import build_source
from geodino.data.sources.chips import write_chip_store
from geodino.data.stats import band_statistics, write_stats_file
from geodino.errors import DataError, GeodinoError
from geodino.models import load_backbone
from geodino.models.extract import Extractor
from geodino.models.registry import is_arch
from geodino.outputs import atomic_output, atomic_write_text, check_outputs, output_dir, write_errors
from geodino.runs import default_run_dir, setup_logging
from geodino.runtime import resolve_device

log = logging.getLogger("geodino")


def _stats_out(cfg) -> Path:
    if cfg.get("out"):
        out = Path(str(cfg.out)).expanduser()
        return out if out.suffix == ".json" else out / "band_stats.json"
    paths = cfg.data.get("paths")
    if paths is None:  # the packaged sample: never write into the installed package
        return Path("outputs") / "curate" / str(cfg.data.name) / "band_stats.json"
    first = Path(str(paths if isinstance(paths, str) else paths[0])).expanduser()
    return (first if first.is_dir() else first.parent) / "band_stats.json"


def _source_meta(cfg, info) -> dict:
    src = info.source
    meta = {"data": str(cfg.data.name), "kind": str(cfg.data.kind), "bands": list(info.band_names)}
    if cfg.data.kind == "raster":
        meta.update({"seed": int(src.seed), "chip_size": int(src.chip_size), "scale": float(src.scale),
                     "offset": float(src.offset), "sensor": src.sensor, "files": [str(f) for f in src.files]})
    elif cfg.data.kind == "chips":  # a chip list of the store's chips (data=chips data.chip_list=)
        meta.update({"store": str(src.path), "chip_size": int(src.chip_size), "scale": float(src.scale),
                     "offset": float(src.offset), "sensor": src.sensor})
    return meta


def _as_list(v) -> list:
    if v in (None, ""):
        return []
    return [v] if isinstance(v, (str, Path)) else list(v)


def _inputs(cfg) -> list:
    """Every file the command reads that an output could land on."""
    data = cfg.data
    ins = [cfg.get("weights"), data.get("stats_file"), data.get("file_list"), data.get("chip_list"),
           *_as_list(data.get("paths"))]
    if not is_arch(str(cfg.get("backbone", ""))):
        ins.append(cfg.get("backbone"))
    for key in ("embeddings", "queries"):
        if cfg.get(key):
            p = Path(str(cfg.get(key))).expanduser()
            ins += [p / EMBEDDINGS_FILE, p / ITEMS_FILE, p / META_FILE] if p.is_dir() else [p]
    return [str(p) for p in ins if p not in (None, "")]


# the selection each action writes: <name>.txt (chip / file list) or <name>_indices.txt, <name>_indices.npy
SELECTIONS = {"balance": "balanced", "retrieve": "retrieved", "dedup": "deduplicated"}


def _outputs(cfg, action: str, out_dir: Path) -> list[Path]:
    """The files `action` writes into `out_dir` (the embed output too when there are no embeddings= to reuse)."""
    files = []
    if action == "embed" or not cfg.get("embeddings"):
        files += [out_dir / EMBEDDINGS_FILE, out_dir / ITEMS_FILE, out_dir / META_FILE]
        if str(cfg.data.kind) in CHIP_KINDS:
            files.append(out_dir / FOOTPRINTS_FILE)
    if action in SELECTIONS:
        name = SELECTIONS[action]
        files += [out_dir / f"{name}.txt", out_dir / f"{name}_indices.txt", out_dir / f"{name}_indices.npy",
                  out_dir / f"{action}.json"]
    if action == "balance":
        files.append(out_dir / "tree.npz")
    return files


def run_stats(cfg, progress: bool = True, overwrite: bool = False) -> Path:
    out = _stats_out(cfg)
    check_outputs([out], _inputs(cfg), overwrite=overwrite, what="output")
    info = build_source(cfg.data, seed=int(cfg.seed), progress=progress, stats=False)
    n = int(cfg.get("stats_chips", 256))
    if cfg.data.kind != "raster":  # a folder source cycles through its files; read each once
        n = min(n, len(info.source.files))
    details: dict = {}
    mean, std = band_statistics(info.source, n=n, progress=progress, info=details)
    extra = {"input_scale": info.input_scale, **details,
             **{k: v for k, v in _source_meta(cfg, info).items() if k != "bands"}}
    if cfg.data.kind == "raster":
        extra["skipped_nodata_chips"] = int(info.source.skipped_nodata)
    else:
        extra["files"] = [str(f) for f in info.source.files]
    with output_dir(out.parent):
        write_stats_file(out, list(info.band_names), mean, std, **extra)
    log.info("band statistics of %d %s: mean %s std %s -> %s (use data.stats_file=%s)", details.get("items", n),
             "chips" if cfg.data.kind == "raster" else "images", [round(m, 4) for m in mean],
             [round(s, 4) for s in std], out, out)
    print(f"wrote {out}\nuse it with: data.stats_file={out}")
    return out


def _out_dir(cfg, action: str) -> Path:
    return Path(str(cfg.out)).expanduser() if cfg.get("out") else default_run_dir("curate", action)


def run_embed(cfg, out_dir: Path, progress: bool = True) -> Path:
    """Embed `data=` into an embed output folder `out_dir` (format in geodino.data.curation.embed). Returns out_dir."""
    info = build_source(cfg.data, seed=int(cfg.seed), progress=progress)
    src = info.source
    chips = str(cfg.data.kind) in CHIP_KINDS
    if chips:
        n = int(cfg.get("pool_size") or len(src))
    else:
        n = int(cfg.get("pool_size") or len(src.files))
        n = min(n, len(src.files))
    device = resolve_device(cfg.get("device", "auto"))
    backbone = load_backbone(str(cfg.backbone), weights=cfg.get("weights"), in_chans=info.n_bands,
                             bands=info.band_names, rgb_indices=info.rgb_indices)
    contract = backbone.geodino_contract
    # A trained backbone (weights file or geodino checkpoint) is fed with its own normalisation;
    # a randomly initialised one with the data's statistics.
    mean, std = info.mean, info.std
    trained = cfg.get("weights") is not None or not is_arch(str(cfg.backbone))
    if trained and list(contract.bands) == list(info.band_names):
        mean, std = list(contract.mean), list(contract.std)
    image_size = cfg.get("image_size")
    if image_size is None and not chips:
        image_size = 224  # photos come in every size
    footprints = [] if chips else None  # read with each chip: no second pass over the rasters
    t0 = time.perf_counter()
    emb = embed_source(Extractor(backbone, device), src, batch_size=int(cfg.get("batch_size", 64)),
                       out_path=out_dir / EMBEDDINGS_FILE, progress=progress, indices=np.arange(n), mean=mean, std=std,
                       image_size=image_size, num_workers=int(cfg.get("num_workers", 0)),
                       footprints=footprints)
    seconds = time.perf_counter() - t0
    spread = float(np.asarray(emb[: min(len(emb), 4096)]).std(0).max())
    if spread < 1e-3:
        log.warning("the embeddings are (nearly) identical (largest per-dimension std %.1e): is backbone=%s "
                    "untrained? Curation needs a trained backbone (weights=... or a geodino run directory)",
                    spread, cfg.backbone)
    meta = _source_meta(cfg, info)
    doc = {"n": int(emb.shape[0]), "dim": int(emb.shape[1]), "backbone": str(cfg.backbone),
           "weights": None if cfg.get("weights") is None else str(cfg.weights), "mean": list(mean), "std": list(std),
           "image_size": image_size, "seconds": round(seconds, 3), "torch_threads": torch.get_num_threads(),
           **meta}
    if chips:
        doc["skipped_nodata_chips"] = int(src.skipped_nodata)
        doc["footprints"] = None
        if write_footprints(out_dir / FOOTPRINTS_FILE, footprints) is not None:
            doc["footprints"] = {"file": FOOTPRINTS_FILE, "crs": footprints[0].get("crs")
                                 if len({f.get("crs") for f in footprints}) == 1 else "EPSG:4326"}
        write_embed_meta(out_dir, doc, chips=[src.chip_index(i) for i in range(n)], chip_header=meta)
    else:
        write_embed_meta(out_dir, doc, files=src.files[:n], file_header=f"geodino file list: data={cfg.data.name}")
    log.info("embedded %d items (%d-d) in %.1f s -> %s", emb.shape[0], emb.shape[1], seconds, out_dir / EMBEDDINGS_FILE)
    return out_dir


def _write_selection(out_dir: Path, name: str, selected: np.ndarray, meta: dict, files, chips) -> Path:
    if chips is not None:
        header = {k: meta[k] for k in ("data", "kind", "seed", "chip_size", "scale", "sensor", "bands", "files") if k in meta}
        path = write_chip_list(out_dir / f"{name}.txt", chips[selected], header)
        hint = f"data.chip_list={path}"
    elif files is not None:
        path = write_file_list(out_dir / f"{name}.txt", [files[i] for i in selected],
                               header=f"geodino file list: {name} from data={meta.get('data')}")
        hint = f"data.file_list={path}"
    else:
        path = atomic_write_text(out_dir / f"{name}_indices.txt", "\n".join(str(int(i)) for i in selected) + "\n")
        hint = "(row indices into the embeddings)"
    with atomic_output(out_dir / f"{name}_indices.npy") as tmp:
        np.save(tmp, np.asarray(selected, dtype=np.int64))
    print(f"wrote {path} ({len(selected)} items)\nuse it with: {hint}")
    return path


def _pool(cfg, out_dir: Path, progress: bool):
    if cfg.get("embeddings"):
        return load_embeddings(cfg.embeddings)
    run_embed(cfg, out_dir, progress)
    return load_embeddings(out_dir)


def run_balance(cfg, out_dir: Path, progress: bool = True) -> Path:
    x, meta, files, chips = _pool(cfg, out_dir, progress)
    levels: list[int] = []
    for k in (int(k) for k in cfg.levels):  # a small pool gets fewer clusters, still shrinking per level
        k = min(k, x.shape[0], levels[-1] - 1 if levels else x.shape[0])
        if k >= 1:
            levels.append(k)
    if levels != [int(k) for k in cfg.levels]:
        log.info("levels %s lowered to %s for a pool of %d items", list(cfg.levels), levels, x.shape[0])
    t0 = time.perf_counter()
    tree = hierarchical_kmeans(x, levels, n_resampling_steps=cfg.get("resampling_steps", 0),
                               sample_size=cfg.get("resampling_size", 10), seed=int(cfg.seed), progress=progress,
                               niter=int(cfg.get("kmeans_iters", 20)), init=str(cfg.get("kmeans_init", "random")),
                               max_train_points=cfg.get("max_train_points"))
    t1 = time.perf_counter()
    selected = balanced_sample(tree, int(cfg.n_samples), strategy=str(cfg.get("strategy", "r")), seed=int(cfg.seed))
    t2 = time.perf_counter()
    with atomic_output(out_dir / "tree.npz") as tmp:
        tree.save(tmp)
    top = tree.point_labels(tree.n_levels - 1)
    before = np.bincount(top, minlength=levels[-1])
    after = np.bincount(top[selected], minlength=levels[-1])
    summary = {"n_pool": int(x.shape[0]), "n_selected": int(len(selected)), "levels": levels,
               "kmeans_seconds": round(t1 - t0, 3), "sampling_seconds": round(t2 - t1, 3),
               "top_level_sizes": before.tolist(), "top_level_selected": after.tolist(), "tree": tree.meta}
    atomic_write_text(out_dir / "balance.json", json.dumps(summary, indent=2))
    log.info("balanced sampling: %d of %d items from %s clusters in %.1f s", len(selected), x.shape[0], levels, t2 - t0)
    return _write_selection(out_dir, SELECTIONS["balance"], selected, meta, files, chips)


def run_retrieve(cfg, out_dir: Path, progress: bool = True) -> Path:
    x, meta, files, chips = _pool(cfg, out_dir, progress)
    q, _, _, _ = load_embeddings(cfg.queries)
    t0 = time.perf_counter()
    union = retrieve(x, q, k=int(cfg.get("k", 10)), index=str(cfg.get("index", "flat")), nlist=cfg.get("nlist"),
                     nprobe=int(cfg.get("nprobe", 16)), progress=progress, seed=int(cfg.seed))
    n_retrieved = len(union)
    if cfg.get("dedup_threshold") is not None:
        keep = deduplicate(x[union], float(cfg.dedup_threshold), progress=progress)
        union = union[keep]
    summary = {"n_pool": int(x.shape[0]), "n_queries": int(q.shape[0]), "k": int(cfg.get("k", 10)),
               "index": str(cfg.get("index", "flat")), "n_retrieved": int(n_retrieved), "n_kept": int(len(union)),
               "dedup_threshold": cfg.get("dedup_threshold"), "seconds": round(time.perf_counter() - t0, 3)}
    atomic_write_text(out_dir / "retrieve.json", json.dumps(summary, indent=2))
    return _write_selection(out_dir, SELECTIONS["retrieve"], union, meta, files, chips)


def run_dedup(cfg, out_dir: Path, progress: bool = True) -> Path:
    x, meta, files, chips = _pool(cfg, out_dir, progress)
    ref = load_embeddings(cfg.queries)[0] if cfg.get("queries") else None
    keep = deduplicate(x, float(cfg.get("dedup_threshold") or 0.95), reference=ref, progress=progress)
    atomic_write_text(out_dir / "dedup.json", json.dumps({"n_pool": int(x.shape[0]), "n_kept": int(len(keep))}, indent=2))
    return _write_selection(out_dir, SELECTIONS["dedup"], keep, meta, files, chips)


ACTIONS = ("stats", "embed", "balance", "retrieve", "dedup", "chip")


def run_chip(cfg, progress: bool = True) -> Path:
    """Cut the chips of a raster ``data=`` source into a chip store (geodino.data.sources.chips), with the band
    statistics of the chips, for ``data=chips data.paths=[<store>]``."""
    if str(cfg.data.kind) != "raster":
        raise DataError(f"action=chip cuts a raster source; data={cfg.data.name} is a {cfg.data.kind} source")
    out = Path(str(cfg.out)).expanduser() if cfg.get("out") else default_run_dir("curate", "chip")
    info = build_source(cfg.data, seed=int(cfg.seed), progress=progress, stats=False)
    src = info.source
    n = int(cfg.get("n_chips") or len(src))
    details: dict = {}
    mean, std = band_statistics(src, n=min(n, int(cfg.get("stats_chips", 256))), progress=progress, info=details)
    t0 = time.perf_counter()
    with output_dir(out.parent), write_errors(out):  # a failed cut leaves no folder it created, one line
        try:
            write_chip_store(src, out, n, shard_size=int(cfg.get("shard_size", 4096)), progress=progress,
                             meta={"stats": {"mean": mean, "std": std, **details}, "data": str(cfg.data.name),
                                   "chip_list": cfg.data.get("chip_list"), "rows": list(src.rows)})
        except BaseException:
            shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)  # where the store is written
            raise
    print(f"wrote {n} chips to {out} in {time.perf_counter() - t0:.1f} s\nuse it with: data=chips data.paths=[{out}]")
    return out


def run_curate(cfg):
    """`geodino curate action=stats|embed|balance|retrieve|dedup|chip ...` (see configs/curate.yaml)."""
    setup_logging()
    action = str(cfg.action)
    if action not in ACTIONS:
        raise GeodinoError(f"unknown action '{action}'; choose one of: {', '.join(ACTIONS)}")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
        faiss.omp_set_num_threads(int(cfg.threads))
    progress = bool(cfg.get("progress", True))
    overwrite = bool(cfg.get("overwrite", False))
    if action == "stats":
        return run_stats(cfg, progress, overwrite)
    if action == "chip":  # a chip store refuses an existing out= itself
        return run_chip(cfg, progress)
    if action == "retrieve" and not cfg.get("queries"):
        raise DataError("action=retrieve needs queries=<embed output folder or .npy of the seed set> "
                        "(embed the seed set with `geodino curate action=embed data=... out=...`)")
    out_dir = _out_dir(cfg, action)
    check_outputs(_outputs(cfg, action, out_dir), _inputs(cfg), overwrite=overwrite, what="output")
    with output_dir(out_dir):  # a failed command leaves no output folder behind
        if action == "embed":
            out = run_embed(cfg, out_dir, progress)
            extra = f" and {out / FOOTPRINTS_FILE}" if (out / FOOTPRINTS_FILE).is_file() else ""
            print(f"wrote {out / EMBEDDINGS_FILE}, {out / ITEMS_FILE}{extra}")
            return out
        return {"balance": run_balance, "retrieve": run_retrieve, "dedup": run_dedup}[action](cfg, out_dir, progress)
