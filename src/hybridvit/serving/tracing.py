"""OpenTelemetry tracing for the server: spans for receive, decode, queue wait, batch and model.

Off by default, and then free: no OpenTelemetry import, every hook a ``None`` check. On when
``configure`` is called with an exporter (tests: the SDK's in-memory one), or when the standard
variables ask for it: ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``) or an OTLP endpoint
(``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``); OTLP's exporter reads
its own ``OTEL_EXPORTER_OTLP_*`` settings, and ``OTEL_SERVICE_NAME`` names the service. A client's
W3C ``traceparent`` header (or gRPC metadata) makes a request's spans part of its trace.

A request's spans nest: ``receive`` holds ``decode``, ``queue`` (waiting for its batch) and
``model`` (its batch's model call, with the batch size). Each batch is a ``batch`` span of its
own, linked to every request it served; each request's ``model`` span links back to it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

_tracer: Any = None  # an OpenTelemetry tracer while tracing is on


def wanted() -> bool:
    """The standard variables ask for traces."""
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def configure(exporter: Any = None) -> bool:
    """Turn tracing on with ``exporter`` (a span exporter, sent spans as they end), or with the
    exporter the standard variables name; returns whether tracing is on."""
    global _tracer
    if exporter is None and not wanted():
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError as e:
        raise ImportError(f'tracing needs the OpenTelemetry SDK: pip install "hybridvit[serve]" ({e})') from e
    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME",
                                                                                       "hybridvit")}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        for name in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(","):
            provider.add_span_processor(BatchSpanProcessor(_exporter(name.strip().lower())))
    _tracer = provider.get_tracer("hybridvit.serving")
    return True


def _exporter(name: str) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER={name}: hybridvit exports otlp or console")
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL",
                                                                                  "http/protobuf"))
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter()


def disable() -> None:
    global _tracer
    _tracer = None


def on() -> bool:
    return _tracer is not None


def extract(carrier: Mapping[str, str]) -> Any:
    """The caller's trace context from ``traceparent`` (None when tracing is off or none came)."""
    if _tracer is None:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract(carrier=dict(carrier))


def span(name: str, context: Any = None, attributes: dict[str, Any] | None = None) -> Any:
    """A span around a block, the current one's child (or ``context``'s); a no-op when off."""
    if _tracer is None:
        return nullcontext()
    return _tracer.start_as_current_span(name, context=context, attributes=attributes)


@dataclass
class Waiting:
    """One image's way through a batch, for its request's ``queue`` and ``model`` spans."""

    request: Any  # the request's span context, to which the batch links
    submitted: int  # ns
    batch: Any = None  # the batch span's context
    started: int = 0
    ended: int = 0
    size: int = 0


def waiting() -> Waiting | None:
    """A record to pass with an image into the batcher (None when off)."""
    if _tracer is None:
        return None
    import time

    from opentelemetry import trace

    return Waiting(trace.get_current_span().get_span_context(), time.time_ns())


@contextmanager
def batch(records: list[Waiting | None], size: int) -> Iterator[None]:
    """The ``batch`` span around one model call, linked to every request in it."""
    if _tracer is None or not any(records):
        yield
        return
    import time

    from opentelemetry import trace
    from opentelemetry.trace import Link

    started = time.time_ns()
    links = [Link(r.request) for r in records if r is not None]
    with _tracer.start_as_current_span("batch", context=trace.set_span_in_context(trace.INVALID_SPAN), links=links,
                                       attributes={"batch.size": size}, start_time=started) as batch_span:
        yield
    ended = time.time_ns()
    for record in records:
        if record is not None:
            record.batch, record.started, record.ended, record.size = (batch_span.get_span_context(), started,
                                                                       ended, size)


def queued_and_ran(records: list[Waiting | None]) -> None:
    """A request's ``queue`` and ``model`` spans, from its images' records (the first image's
    wait to the last image's batch end)."""
    records = [r for r in records if r is not None and r.batch is not None]
    if _tracer is None or not records:
        return
    from opentelemetry.trace import Link

    first = min(records, key=lambda r: r.started)
    _tracer.start_span("queue", start_time=first.submitted).end(end_time=first.started)
    model = _tracer.start_span("model", start_time=first.started, links=[Link(r.batch) for r in records],
                               attributes={"batch.size": first.size,
                                           "batches": len({id(r.batch) for r in records})})
    model.end(end_time=max(r.ended for r in records))
