"""The plans at a glance: one row per configuration, for people (terminal or Markdown)."""

from __future__ import annotations

COLUMNS = ("configuration", "spacing", "median shape", "patch", "batch", "stages", "features", "normalization")


def _fmt(seq, fmt="{}") -> str:
    return " x ".join(fmt.format(v) for v in seq)


def plans_rows(plans: dict) -> list[tuple[str, ...]]:
    rows = []
    for name, c in plans["configurations"].items():
        if "inherits_from" in c:
            rows.append((name, f"(as {c['inherits_from']}, after {c.get('previous_stage', '?')})", "", "", "", "", "", ""))
            continue
        arch = c["architecture"]["arch_kwargs"]
        rows.append((
            name,
            _fmt(c["spacing"], "{:.3g}"),
            _fmt(c["median_image_size_in_voxels"], "{:.0f}"),
            _fmt(c["patch_size"]),
            str(c["batch_size"]),
            str(arch["n_stages"]),
            f"{arch['features_per_stage'][0]}..{arch['features_per_stage'][-1]}",
            ", ".join(s.removesuffix("Normalization") + (" (mask)" if m else "")
                      for s, m in zip(c["normalization_schemes"], c["use_mask_for_norm"])),
        ))
    return rows


def plans_markdown(plans: dict) -> str:
    rows = plans_rows(plans)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def print_plans(plans: dict) -> None:
    """A rich table on the terminal."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{plans.get('dataset_name', '')} — {plans.get('plans_name', '')} "
                        f"(transpose {plans.get('transpose_forward')})")
    for col in COLUMNS:
        table.add_column(col)
    for row in plans_rows(plans):
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # logs and CI: do not squeeze the table into 80 columns
        console = Console(width=140)
    console.print(table)
