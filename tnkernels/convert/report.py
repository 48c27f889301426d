"""The report returned by tensorize(): one row per candidate layer, printable as a table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class LayerReport:
    name: str
    kind: str  # "mpo" | "tucker" | "-" (left dense)
    shape: tuple[int, ...]
    params_before: int
    params_after: int
    ratio: float
    rel_error: float | None
    seconds: float
    status: str  # "tensorized" or "skipped: <reason>"
    structure: str = ""  # modes/bonds or ranks

    @property
    def tensorized(self) -> bool:
        return self.status == "tensorized"


@dataclass
class TensorizeReport:
    rows: list[LayerReport] = field(default_factory=list)

    @property
    def tensorized(self) -> list[LayerReport]:
        return [r for r in self.rows if r.tensorized]

    @property
    def skipped(self) -> list[LayerReport]:
        return [r for r in self.rows if not r.tensorized]

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.tensorized)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.tensorized)

    @property
    def ratio(self) -> float:
        """Compression of the tensorized layers' weights (dense / tensorized)."""
        return self.params_before / self.params_after if self.params_after else 1.0

    def to_dict(self) -> dict:
        return {
            "rows": [asdict(r) for r in self.rows],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "ratio": self.ratio,
        }

    def __str__(self) -> str:
        header = (
            "layer",
            "kind",
            "shape",
            "params",
            "tensorized",
            "ratio",
            "rel.err",
            "time",
            "structure / status",
        )
        lines = []
        for r in self.rows:
            detail = r.structure if r.tensorized else r.status
            lines.append(
                (
                    r.name,
                    r.kind,
                    "x".join(map(str, r.shape)),
                    f"{r.params_before:,}",
                    f"{r.params_after:,}" if r.tensorized else "-",
                    f"{r.ratio:.2f}" if r.tensorized else "-",
                    f"{r.rel_error:.4f}" if r.rel_error is not None else "-",
                    f"{r.seconds:.2f}s",
                    detail,
                )
            )
        widths = [max(len(h), *(len(line[c]) for line in lines)) if lines else len(h) for c, h in enumerate(header)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
        out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        out += [fmt.format(*line) for line in lines]
        out.append(
            f"{len(self.tensorized)} layers tensorized, {len(self.skipped)} left dense; "
            f"weights {self.params_before:,} -> {self.params_after:,} ({self.ratio:.2f}x)"
        )
        return "\n".join(out)
