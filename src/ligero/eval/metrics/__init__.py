"""Audit metrics as plug-ins: the registry the audit, the card builder and the renderers iterate.

A metric is one module here with a Metric subclass (see base.py for the interface); listing an instance in
METRICS (or appending one to it) wires it into the audit's measurements, comparisons and summary rows, the
deployment card (fields, schema, Markdown) and the report (columns, notes, figures, sections). The order below is
the order of every measurement, table column, card line and figure.
"""

from __future__ import annotations

from ligero.eval.metrics.base import CARD_SECTIONS, MeasureContext, Metric, ReportSection, Thresholds
from ligero.eval.metrics.bbq import BBQ
from ligero.eval.metrics.bias import Bias
from ligero.eval.metrics.domain import DomainPerplexity
from ligero.eval.metrics.energy import Energy
from ligero.eval.metrics.memory import Memory
from ligero.eval.metrics.profile import Profile
from ligero.eval.metrics.quality import Quality
from ligero.eval.metrics.routing import Routing
from ligero.eval.metrics.shift import Shift
from ligero.eval.metrics.speed import Speed
from ligero.eval.metrics.toxicity import Toxicity
from ligero.eval.metrics.winobias import WinoBias

METRICS: list[Metric] = [Quality(), DomainPerplexity(), Bias(), WinoBias(), BBQ(), Speed(), Energy(), Memory(),
                         Toxicity(), Shift(), Routing(), Profile()]

__all__ = ["CARD_SECTIONS", "METRICS", "MeasureContext", "Metric", "ReportSection", "Thresholds"]
