"""One report of every way a state dict misses a model: missing keys, unexpected keys, wrong shapes.

Shared by the DiT/T5 loader (`wanmoe.checkpoint`) and the VAE loader (`wanmoe.models.vae`), so a bad checkpoint
reads the same whichever component it is for. Shapes only: nothing here touches tensor data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = ["first_items", "mismatch_report"]


def first_items(items: Iterable[str], n: int = 10) -> str:
    """The first ``n`` names in sorted order, with a count of the rest."""
    items = sorted(items)
    more = f", ... (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def mismatch_report(expected: Mapping[str, tuple[int, ...]], got: Mapping[str, tuple[int, ...]]) -> list[str]:
    """One line per kind of problem (empty when ``got`` fits ``expected``): names -> shapes on both sides."""
    missing = expected.keys() - got.keys()
    unexpected = got.keys() - expected.keys()
    wrong = [f"{k}: file {tuple(got[k])} vs model {tuple(expected[k])}"
             for k in sorted(expected.keys() & got.keys()) if tuple(got[k]) != tuple(expected[k])]
    lines = []
    if missing:
        lines.append(f"missing keys ({len(missing)}): {first_items(missing)}")
    if unexpected:
        lines.append(f"unexpected keys ({len(unexpected)}): {first_items(unexpected)}")
    if wrong:
        lines.append(f"wrong shapes ({len(wrong)}): " + "; ".join(wrong[:10]) + (" ..." if len(wrong) > 10 else ""))
    return lines
