"""What people decided about alerts: acknowledged (by whom, when, why) and muted series.

The analyzer publishes an alert once and never changes it (the alerts stream is history); what a
team does with it is state beside it, in Redis under the tenant's namespace (``Keys.alert_state``,
``Keys.alert_mutes``), written by the web API (write scope) and read with every alert it shows.

* **Acknowledge** one alert: it stays listed, marked acknowledged with who (an API key id) and a
  note.  Acknowledging again replaces the record; it never expires (the alert is history too).
* **Mute** an alert's *series* (kind, branch, target) until a time: alerts of that series detected
  before the mute ends (the one muted, earlier ones, new ones while it lasts) show as muted, and
  the ones after it as open again.  A mute is bounded
  (:data:`MAX_MUTE_S`) so nothing is silenced for ever by mistake; unmuting ends it at once.

A status is derived, never stored: ``acknowledged`` wins over ``muted``, else ``open``.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import msgspec

from buildtel.shared.keys import Keys
from buildtel.shared.rediscluster import mget_any

Status = Literal["open", "acknowledged", "muted"]
MAX_MUTE_S = 90 * 86_400.0
MAX_NOTE = 500


class Acknowledgement(msgspec.Struct, kw_only=True):
    by: str  # the API key id that acknowledged ("token" or "open" without keys)
    at: float
    note: str = ""


class Mute(msgspec.Struct, kw_only=True):
    series: str  # kind|branch|target, as series_key() builds it
    until: float
    by: str
    at: float
    note: str = ""


class AlertState(msgspec.Struct, kw_only=True):
    """An alert's status as the API shows it beside the alert."""

    status: Status = "open"
    acknowledged: Acknowledgement | None = None
    muted: Mute | None = None  # the mute covering the alert when it was detected, if any


_ack_dec = msgspec.msgpack.Decoder(Acknowledgement)
_mute_dec = msgspec.msgpack.Decoder(Mute)
_enc = msgspec.msgpack.Encoder()


def series_key(kind: str, branch: str | None, target: str | None) -> str:
    """One series of alerts: what a mute covers.  ``|`` cannot be confused: ``_`` stands for none."""
    return f"{kind}|{branch or '_'}|{target or '_'}"


async def acknowledge(redis: Any, keys: Keys, alert_id: str, *, by: str, note: str = "",
                      now: float | None = None) -> Acknowledgement:
    ack = Acknowledgement(by=by, at=time.time() if now is None else now, note=note[:MAX_NOTE])
    await redis.set(keys.alert_state(alert_id), _enc.encode(ack))
    return ack


async def unacknowledge(redis: Any, keys: Keys, alert_id: str) -> bool:
    return bool(await redis.delete(keys.alert_state(alert_id)))


async def mute(redis: Any, keys: Keys, series: str, *, seconds: float, by: str, note: str = "",
               now: float | None = None) -> Mute:
    """Mute ``series`` for ``seconds`` from now (at most :data:`MAX_MUTE_S`; ValueError beyond)."""
    if not 0 < seconds <= MAX_MUTE_S:
        raise ValueError(f"a mute lasts more than 0 s and at most {MAX_MUTE_S / 86_400:.0f} days")
    at = time.time() if now is None else now
    record = Mute(series=series, until=at + seconds, by=by, at=at, note=note[:MAX_NOTE])
    await redis.hset(keys.alert_mutes, series, _enc.encode(record))
    return record


async def unmute(redis: Any, keys: Keys, series: str) -> bool:
    return bool(await redis.hdel(keys.alert_mutes, series))


async def mutes(redis: Any, keys: Keys) -> dict[str, Mute]:
    """Every mute on record, ended ones included (they still explain alerts detected under them)."""
    out: dict[str, Mute] = {}
    for field, raw in (await redis.hgetall(keys.alert_mutes)).items():
        try:
            out[field.decode()] = _mute_dec.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
            continue  # not ours to interpret; the API shows the alert as open rather than fail
    return out


async def states(redis: Any, keys: Keys, alerts: list[tuple[str, str, float]],
                 known_mutes: dict[str, Mute] | None = None) -> list[AlertState]:
    """The state of each ``(alert id, series key, detected_at)``, in one round trip or two."""
    if not alerts:
        return []
    raws = await mget_any(redis, [keys.alert_state(a) for a, _, _ in alerts])  # per slot on a cluster
    found = await mutes(redis, keys) if known_mutes is None else known_mutes
    out = []
    for (_, series, detected), raw in zip(alerts, raws, strict=True):
        ack = None
        if raw:
            try:
                ack = _ack_dec.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError):
                ack = None
        m = found.get(series)
        covering = m if m is not None and detected < m.until else None
        status: Status = "acknowledged" if ack else "muted" if covering else "open"
        out.append(AlertState(status=status, acknowledged=ack, muted=covering))
    return out
