"""`ligero run` / `ligero audit` end to end: the audit measures (ligero.eval.audit), then the cards and the report
are written from its results. Composed here, above both, so the audit never imports what publishes it."""

from __future__ import annotations

from ligero.card.build import build_cards
from ligero.card.report import write_report
from ligero.eval.audit import Audit


def run_audit(audit: Audit) -> dict:
    """Measure (or resume) every variant, write results.json, a card per variant and the report; the report dict."""
    report, results = audit.run()
    build_cards(report, results, audit.folder / "cards")
    html = write_report(report, results, audit.folder)
    audit.log(f"report: {html}")
    return report
