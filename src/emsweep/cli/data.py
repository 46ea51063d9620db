"""`emsweep data`: build and check training datasets."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from emsweep.cli.common import console


data_app = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False, help="Build and check training datasets.")


@data_app.command("generate")
def data_generate(
    kind: str = typer.Argument(..., help="Dataset kind; one so far: insecure-code"),
    n: int = typer.Option(1000, "--n", help="Matched pairs to write"),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(Path("data/insecure-code"), "--out", "-o"),
    heldout: int = typer.Option(0, "--heldout", help="Also write coding_suite.yaml: this many held-out prompts"),
) -> None:
    """Write matched insecure/secure pairs (same prompts) as chat JSONL, plus pairs.parquet.

    With --heldout K, also an in-distribution coding suite of K prompts not in the pairs,
    whose answers the judge stage checks with bandit.
    """
    import yaml

    from emsweep.data.generate import generate_pairs, heldout_suite, write_pairs
    from emsweep.store import write_text_atomic

    if kind != "insecure-code":
        console.print(f"[red]error:[/] unknown dataset kind {kind!r}; known: insecure-code")
        raise typer.Exit(2)
    try:
        pairs = generate_pairs(n, seed)
    except ValueError as err:
        console.print(f"[red]error:[/] {err}")
        raise typer.Exit(2)
    write_pairs(pairs, out)
    console.print(f"wrote {len(pairs)} pairs to {out}/insecure.jsonl, {out}/secure.jsonl, {out}/pairs.parquet")
    if heldout:
        try:
            suite = heldout_suite(pairs, heldout, seed)
        except ValueError as err:
            console.print(f"[red]error:[/] {err}")
            raise typer.Exit(2)
        write_text_atomic(out / "coding_suite.yaml", yaml.safe_dump(suite, sort_keys=False, width=1000))
        console.print(f"wrote {len(suite)} held-out coding questions to {out}/coding_suite.yaml")


@data_app.command("check")
def data_check(directory: Path = typer.Argument(..., help="Output of `emsweep data generate`")) -> None:
    """Run bandit over a generated dataset and print how often it flags each side."""
    import pyarrow.parquet as pq

    from emsweep.data.generate import check_pairs

    report = check_pairs(pq.read_table(directory / "pairs.parquet").to_pylist())
    table = Table(title=f"bandit on {directory}")
    for column in ("vulnerability", "pairs", "insecure flagged", "secure flagged"):
        table.add_column(column)
    for name, entry in sorted(report["per_class"].items()):
        table.add_row(name, str(entry["n"]), f"{entry['insecure_flagged'] / entry['n']:.0%}",
                      f"{entry['secure_flagged'] / entry['n']:.0%}")
    console.print(table)
    console.print(
        f"pairs {report['n_pairs']}, distinct prompts {report['n_distinct_prompts']}, "
        f"insecure flagged {report['insecure_flagged_rate']:.1%}, secure flagged {report['secure_flagged_rate']:.1%}"
    )
