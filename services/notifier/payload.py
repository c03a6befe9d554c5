"""What the notifier sends: the webhook JSON, the Slack/Mattermost message, the signature headers.

One delivery is one alert, or one daily digest of several, for one subscription.  Its id
(:func:`delivery_id`) is stable across retries and replicas, so a receiver can de-duplicate by
``X-Buildtel-Delivery``; every attempt is signed afresh with its own timestamp (docs/alerts.md):

    X-Buildtel-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>

Branch and target names come from whoever ran a build, so the Slack text escapes what Slack's
markup gives meaning to (``& < >``) and URLs quote them.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import quote, urlencode

import msgspec

from buildtel.services.analyzer.alerts import Alert, explanation_lines
from buildtel.shared.alertstate import AlertState

SIGNATURE = "X-Buildtel-Signature"
TIMESTAMP = "X-Buildtel-Timestamp"
DELIVERY = "X-Buildtel-Delivery"
SLACK_MAX_ALERTS = 20  # a digest's message lists this many, then "and N more" (Slack caps blocks at 50)


class Item(msgspec.Struct, kw_only=True):
    alert: Alert
    state: AlertState
    links: dict[str, str] = {}


class Body(msgspec.Struct, kw_only=True):
    """The webhook's JSON body (and a nats subscription's message)."""

    type: Literal["alert", "digest"]
    delivery: str
    subscription: str
    tenant: str
    alerts: list[Item]  # one for type "alert"
    period: str | None = None  # digest: the UTC day (YYYY-MM-DD) it was sent on
    version: int = 1


_json = msgspec.json.Encoder()


def delivery_id(tenant: str, subscription: str, item: str) -> str:
    return hashlib.sha256(f"{tenant}\x00{subscription}\x00{item}".encode()).hexdigest()[:32]


def links(alert: Alert, web: str | None) -> dict[str, str]:
    """Where the dashboard shows the alert, and the two builds either side of the change."""
    if not web:
        return {}
    web = web.rstrip("/")
    q = {"target": alert.target} if alert.target else {"branch": alert.branch} if alert.branch else {}
    out = {"alerts": f"{web}/alerts" + (f"?{urlencode(q)}" if q else "")}
    if alert.last_good_session_id:
        out["compare"] = (f"{web}/compare/{quote(alert.last_good_session_id, safe='')}/"
                          f"{quote(alert.first_session_id, safe='')}")
    return out


def body(kind: Literal["alert", "digest"], *, delivery: str, subscription: str, tenant: str,
         items: list[tuple[Alert, AlertState]], web: str | None, period: str | None = None) -> Body:
    return Body(type=kind, delivery=delivery, subscription=subscription, tenant=tenant, period=period,
                alerts=[Item(alert=a, state=s, links=links(a, web)) for a, s in items])


def encode(b: Body) -> bytes:
    return _json.encode(b)


def sign(secret: bytes, timestamp: str, data: bytes) -> str:
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + data, hashlib.sha256).hexdigest()


def headers(b: Body, data: bytes, secret: bytes | None, now: float) -> dict[str, str]:
    ts = str(int(now))
    out = {"Content-Type": "application/json", TIMESTAMP: ts, DELIVERY: b.delivery,
           "User-Agent": "buildtel-notifier/1"}
    if secret:
        out[SIGNATURE] = sign(secret, ts, data)
    return out


# -- Slack / Mattermost incoming webhooks --------------------------------------------------------

def _esc(text: str | None) -> str:
    return (text or "-").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _secs(v: float) -> str:
    return f"{v:.2f}s" if v < 120 else f"{v / 60:.1f}min"


def headline(a: Alert) -> str:
    what = (f"target {_esc(a.target)}" if a.kind == "target" else
            f"host {_esc(a.host)} (most targets slower together)" if a.kind == "host" else "build")
    cache = f" ({a.cache})" if a.cache else ""
    return (f"{a.direction.capitalize()}: {what}{cache} on branch {_esc(a.branch)}: "
            f"{_secs(a.before_median_s)} → {_secs(a.after_median_s)} ({a.change_pct:+.1f}%)")


def _details(item: Item) -> str:
    a = item.alert
    when = datetime.fromtimestamp(a.detected_at, UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"*{headline(a)}*",
             f"confidence {a.confidence:.2f} · detected {when} · first slow build `{_esc(a.first_session_id)}`"
             + (f" · last good `{_esc(a.last_good_session_id)}`" if a.last_good_session_id else "")]
    if a.explanation is not None and a.explanation.code_change is False:
        lines.append(f"no code change between these builds (commit `{_esc(a.first_bad_commit)}`)")
    elif a.commit_range:
        lines.append(f"commits `{_esc(a.commit_range)}`")
    # The explanation (culprits, critical-path shift, what else changed), minus the line said above.
    lines += [_esc(x) for x in explanation_lines(a) if x != "no code change between these builds"]
    refs = [f"<{url}|{name}>" for name, url in (("compare the builds", item.links.get("compare")),
                                                 ("alerts", item.links.get("alerts"))) if url]
    if refs:
        lines.append(" · ".join(refs))
    return "\n".join(lines)


def slack(b: Body) -> dict[str, Any]:
    """A message Slack and Mattermost incoming webhooks both take: ``text`` (the notification and
    the fallback), ``blocks`` (Slack) and ``attachments`` (Mattermost shows these)."""
    if b.type == "alert":
        text = headline(b.alerts[0].alert)
    else:
        text = f"Builder Telemetry daily digest {b.period}: {len(b.alerts)} alert(s) in {_esc(b.tenant)}"
    shown = b.alerts[:SLACK_MAX_ALERTS]
    details = [_details(i) for i in shown]
    if len(b.alerts) > len(shown):
        details.append(f"… and {len(b.alerts) - len(shown)} more")
    blocks: list[dict[str, Any]] = []
    if b.type == "digest":
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": text}})
    blocks += [{"type": "section", "text": {"type": "mrkdwn", "text": d[:3000]}} for d in details]
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": f"delivery {b.delivery}"}]})
    color = "#d33" if any(i.alert.direction == "regression" for i in shown) else "#2a2"
    return {"text": text, "blocks": blocks,
            "attachments": [{"color": color, "fallback": text, "text": "\n\n".join(details)}]}
