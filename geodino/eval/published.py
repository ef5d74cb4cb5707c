"""Published reference numbers the eval reports print next to ours (from docs/eo_data.md §2-4).

Each entry says which split and protocol it was measured with: a geodino linear-probe number on the
LoveDA *val* split is context, not a like-for-like comparison with a UperNet number on the *test*
split. "secondary" marks numbers taken from third-party summaries of the papers.
"""

from __future__ import annotations

LOVEDA = {
    "metric": "mIoU (%) over 7 classes, no-data ignored",
    "protocol": "DINOv3 paper: frozen backbone + UperNet, AdamW lr 6e-5, 80k iters, 512x512 crops, "
                "LoveDA test split via CodaLab (secondary)",
    "numbers": {
        "previous SOTA": 54.4,
        "DINOv3 Sat ViT-7B": 55.3,
        "DINOv3 Web ViT-7B": 56.2,
        "community repro Sat ViT-L + UperNet (frozen, 80k, 512 crops)": 51.98,
        "community repro Web ViT-L + UperNet (frozen, 80k, 512 crops)": 53.72,
    },
    "note": "test split (CodaLab); geodino scores val (test masks are withheld). The paper's head and settings: "
            "geodino eval loveda_paper",
    "command": "geodino eval loveda_paper root=<LoveDA> backbone=dinov3_vit7b16_sat493m weights=<sat493m 7B .pth>",
}

GEOBENCH_CLS = {
    "metric": "top-1 accuracy (%), multilabel F1 (%) for m-bigearthnet",
    "protocol": "DINOv3 model card: frozen backbone, RGB only, linear / logistic-regression probe",
    "numbers": {
        "DINOv3 Sat ViT-L/16": {"m-bigearthnet": 73.0, "m-brick-kiln": 96.5, "m-eurosat": 94.1, "m-forestnet": 60.6,
                                "m-pv4ger": 96.0, "m-so2sat": 57.4, "mean": 79.6},
        "DINOv3 Sat ViT-7B/16": {"m-bigearthnet": 74.0, "m-brick-kiln": 97.2, "m-eurosat": 94.8, "m-forestnet": 62.3,
                                 "m-pv4ger": 96.1, "m-so2sat": 62.1, "mean": 81.1},
        "DINOv3 Web ViT-7B (paper mean, secondary)": {"mean": 81.6},
    },
    "command": "geodino eval geobench_paper root=<geobench> backbone=dinov3_vitl16_sat493m weights=<sat493m ViT-L .pth>",
}

GEOBENCH_SEG = {
    "metric": "mIoU (%)",
    "protocol": "DINOv3 model card: frozen backbone, RGB only, DPT head (lr 3e-5..1e-3, 40k iters); "
                "m-cashew-plant mIoU over its 6 classes present in test",
    "numbers": {
        "DINOv3 Sat ViT-L/16": {"m-cashew-plant": 94.2, "m-chesapeake": 75.6, "m-NeonTree": 61.8, "m-nz-cattle": 83.7,
                                "m-pv4ger-seg": 95.2, "m-SA-crop-type": 36.8, "mean": 74.5},
        "DINOv3 Sat ViT-7B/16": {"m-cashew-plant": 94.1, "m-chesapeake": 76.6, "m-NeonTree": 62.6, "m-nz-cattle": 83.4,
                                 "m-pv4ger-seg": 95.5, "m-SA-crop-type": 37.6, "mean": 75.0},
        "DINOv3 Web ViT-7B (paper mean, secondary)": {"mean": 75.9},
    },
    "command": "geodino eval geobench_paper root=<geobench> backbone=dinov3_vitl16_sat493m weights=<sat493m ViT-L .pth>",
}

CANOPY = {
    "metric": "MAE (m); block R²; bias (m)",
    "protocol": "DINOv3 paper: DPT decoder on frozen backbones trained on SatLidar1M; Open-Canopy test (secondary). "
                "Tolan et al. 2024: NEON aerial test set, 256x256 crops, block R² on 50x50-pixel blocks",
    "numbers": {
        "Open-Canopy MAE: Tolan et al. ViT-L": 2.42,
        "Open-Canopy MAE: DINOv3 Web ViT-7B": 2.17,
        "Open-Canopy MAE: DINOv3 Sat ViT-L": 2.07,
        "Open-Canopy MAE: DINOv3 Sat ViT-7B": 2.02,
        "NEON aerial: Tolan et al. SSL-huge MAE": 3.15,
        "NEON aerial: Tolan et al. SSL-huge block R²": 0.51,
        "NEON aerial: Tolan et al. SSL-huge bias": -1.6,
    },
    "note": "different data (SatLidar1M / Open-Canopy / NEON); a number on your own GeoTIFF pairs is not comparable",
    "command": "geodino eval canopy_paper root=<canopy pairs> backbone=dinov3_vitl16_sat493m weights=<sat493m ViT-L .pth>",
}

PUBLISHED = {"loveda": {"loveda": LOVEDA}, "geobench": {"classification": GEOBENCH_CLS, "segmentation": GEOBENCH_SEG},
             "canopy": {"canopy": CANOPY}}


def published_markdown(task: str) -> str:
    lines = ["", "## Published numbers (context; check split and protocol before comparing)", ""]
    for name, entry in PUBLISHED.get(task, {}).items():
        lines += [f"### {name}: {entry['metric']}", "", f"Protocol: {entry['protocol']}", ""]
        lines += ["| model | value |", "|---|---|"]
        for model, v in entry["numbers"].items():
            if isinstance(v, dict):
                v = ", ".join(f"{k} {x}" for k, x in v.items())
            lines.append(f"| {model} | {v} |")
        if entry.get("note"):
            lines += ["", f"Note: {entry['note']}"]
        if entry.get("command"):
            lines += ["", f"Paper protocol: `{entry['command']}`"]
        lines.append("")
    return "\n".join(lines)
