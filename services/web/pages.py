"""The dashboard: server-rendered pages over the same backend as the API (``docs/dashboard.md``).

Each handler asks the backend (``service.py``: storage, analyzer and tracer over NATS) for what
its page shows, hands it to ``views.py`` for the figures, and renders a Jinja2 template
(autoescaped: every name on a page came from a build and is treated as text).  Nothing is fetched
from elsewhere: the chart library and the page script are served from ``static/``.

Pages need the same key as the API: when keys exist, ``/login`` takes one and keeps it in an
``HttpOnly``, ``SameSite=Strict`` cookie; each request checks it again, so a revoked key stops
working at once.  Changes made from a page (acknowledge, mute) go to the API with the header
:data:`CSRF_HEADER`, which a page of another site cannot send.
"""

from __future__ import annotations

import asyncio
import time
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
import msgspec
from aiohttp import web

from buildtel.services.web import tests_pages, views
from buildtel.services.web.base import (
    BACKEND,
    CALLER,
    COOKIE,
    CSRF_HEADER,
    TENANT,
    Forbidden,
    Unauthorized,
    json_response,
)
from buildtel.services.web.query import (
    AlertsQuery,
    BadInput,
    ReportQuery,
    SessionsQuery,
    TargetHistoryQuery,
    TrendsQuery,
    parse_query,
    parse_session_id,
    parse_time,
)
from buildtel.shared.failrecord import failed_targets

STATIC = Path(__file__).with_name("static")
WINDOWS = (7, 30, 90)
COMPARE_ROWS = 100  # timing changes listed on the compare page (largest first)
REPORT_BUILDS = 200  # builds the overview's slowest targets are taken over


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters.update(duration=views.duration, size=views.size, percent=views.percent, when=views.when,
                       ago=views.ago, short=views.short, urlq=lambda s: quote(str(s), safe=""),
                       partial_notice=views.partial_notice)
    env.filters["json"] = lambda v: msgspec.json.encode(v).decode().replace("</", "<\\/")
    return env


def render(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    """``template`` with ``context``; ``partial``: the storage replies' notes of partitions that did not
    answer, which base.html shows as a notice above the page (none by default: whole)."""
    caller = request.get(CALLER)
    context.setdefault("partial", [])
    body = environment().get_template(template).render(
        tenant=caller.tenant if caller else None, who=caller.who if caller else None, path=request.path,
        csrf_header=CSRF_HEADER, **context)
    resp = web.Response(text=body, status=status, content_type="text/html")
    resp.headers["Content-Security-Policy"] = ("default-src 'self'; img-src 'self' data:; style-src 'self' "
                                               "'unsafe-inline'; object-src 'self'; frame-ancestors 'self'")
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


def _backend(request: web.Request) -> Any:
    return request.app[BACKEND]


def _failure_rules(backend: Any) -> tuple[Any, ...]:
    """The farm's failure-class rules, for records of older sessions (classified on read); a file
    that went bad is said in the web service's log and the built-in rules used."""
    from buildtel.shared.settings import SettingsError

    try:
        return tuple(backend.settings.failure_rule_table())
    except SettingsError as exc:
        backend.log.warning("failure_rules.unusable", error=str(exc))
        return ()


def _tenant(request: web.Request) -> str:
    return request[TENANT]


def _filters(request: web.Request, names: tuple[str, ...]) -> dict[str, str]:
    return {k: v for k, v in request.query.items() if k in names and v}


async def overview(request: web.Request) -> web.Response:
    days = int(request.query.get("days", "30")) if request.query.get("days", "30").isdigit() else 30
    if days not in WINDOWS:
        raise BadInput(f"parameter 'days': choose {', '.join(map(str, WINDOWS))}")
    f = _filters(request, ("branch", "name", "agent", "label"))
    now = time.time()
    since = (now // 86_400 - days + 1) * 86_400
    backend, tenant = _backend(request), _tenant(request)
    # The slowest targets of the last REPORT_BUILDS builds in the window: a report over every build
    # of 90 days on a busy farm would cost seconds, and the latest builds are what people act on.
    report_f = {k: v for k, v in f.items() if k in ("branch", "name")} | {"last": str(REPORT_BUILDS)}
    # Three services, asked at once: the page costs the slowest of them, not their sum.
    trend, alert_page, report = await asyncio.gather(
        backend.trends(tenant, parse_query(f, TrendsQuery), since, now),
        backend.alerts(tenant, AlertsQuery(branch=f.get("branch"), limit=1000)),
        backend.report(tenant, parse_query(report_f, ReportQuery), since, now))
    every = alert_page.alerts
    slowest = sorted(report.get("targets", []), key=lambda t: -(t.get("median_s") or 0))[:10]
    regressed = sorted((a for a in every if a.kind == "target" and a.direction == "regression"),
                       key=lambda a: -a.change_pct)[:10]
    # The tiles and charts come from the trend, the slowest targets from the report: either may lack
    # a partition's builds.
    partial = [*trend.partial, *report.get("partial_notes", [])]
    return render(request, "overview.html", days=days, windows=WINDOWS, filters=f, trend=trend,
                  series=views.trend_series(trend), totals=views.trend_totals(trend), alerts=every[:10],
                  report_builds=report.get("sessions", 0),
                  slowest=slowest, regressed=regressed, query=urlencode(f), partial=partial)


async def sessions(request: web.Request) -> web.Response:
    names = ("outcome", "branch", "agent", "name", "label", "target", "since", "until", "order", "limit", "cursor")
    f = _filters(request, names)
    q = parse_query(f, SessionsQuery)
    page = await _backend(request).sessions(_tenant(request), q, parse_time("since", q.since),
                                            parse_time("until", q.until))
    keep = {k: v for k, v in f.items() if k != "cursor"}
    older = urlencode({**keep, "cursor": page.next_cursor}) if page.next_cursor else None
    return render(request, "sessions.html", page=page, filters=f, older=older, query=urlencode(keep),
                  partial=page.partial)


async def session(request: web.Request) -> web.StreamResponse:
    word = parse_session_id(request.match_info["id"])
    accept = request.headers.get("Accept", "")
    if "application/json" in accept and "text/html" not in accept:
        # what `curl -H 'Accept: application/json'` of the printed link gets
        return json_response(await _backend(request).session(_tenant(request), word))
    backend, tenant = _backend(request), _tenant(request)
    s = await backend.session_struct(tenant, word)
    from buildtel.services.analyzer.bottlenecks import critical_path

    crit = critical_path(s)
    crit_names = [step.name for step in crit.steps]
    alerts = views.naming_alerts((await backend.alerts(tenant, AlertsQuery(limit=1000))).alerts, s.id)
    branch = s.environment.vcs.branch if s.environment and s.environment.vcs else None
    previous, partial = None, []
    if branch:
        prev = await backend.sessions(tenant, SessionsQuery(branch=branch, limit=2), None, s.finish)
        previous = next((p.id for p in prev.sessions if p.id != s.id), None)
        partial += prev.partial  # the previous build may be on the partition away
    tests = await tests_pages.session_tests(request, s)
    if tests is not None:
        partial += tests["partial"]  # flaky marks counted without that partition's builds
    return render(request, "session.html", s=s, crit=crit, timeline=views.timeline(s, crit_names),
                  rows=views.target_rows(s, crit_names), alerts=alerts, branch=branch, previous=previous,
                  health=views.health_data(s), failures=failed_targets(s), tests=tests, partial=partial)


async def target(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    f = _filters(request, ("branch", "agent", "label", "since", "until"))
    q = parse_query({**f, "target": name, "limit": "1000"}, TargetHistoryQuery)
    hist, tests = await asyncio.gather(
        _backend(request).target_history(_tenant(request), q, parse_time("since", q.since),
                                         parse_time("until", q.until)),
        tests_pages.target_tests(request, name, f))
    return render(request, "target.html", name=name, hist=hist, series=views.target_series(hist.runs),
                  flips=views.flips(hist.runs), filters=f, tests=tests, partial=[*hist.partial, *tests["partial"]])


async def tests_index(request: web.Request) -> web.Response:
    return render(request, "tests.html", **await tests_pages.index_context(request))


async def test_page(request: web.Request) -> web.Response:
    return render(request, "test.html", **await tests_pages.test_context(request))


async def alerts(request: web.Request) -> web.Response:
    f = _filters(request, ("branch", "target", "kind", "status", "limit"))
    q = parse_query(f, AlertsQuery)
    page = await _backend(request).alerts(_tenant(request), q)
    return render(request, "alerts.html", alerts=page.alerts, filters=f)


async def compare(request: web.Request) -> web.Response:
    """Two builds side by side: what ``GET /api/v1/diff/{a}/{b}`` answers, laid out, with the
    differential flame graph (B against A)."""
    from buildtel.shared.recording.diff import side_from_session
    from buildtel.shared.recording.diffview import typed_diff

    backend, tenant = _backend(request), _tenant(request)
    a, b = await asyncio.gather(backend.session_struct(tenant, parse_session_id(request.match_info["a"])),
                                backend.session_struct(tenant, parse_session_id(request.match_info["b"])))
    d = typed_diff(side_from_session(a), side_from_session(b))
    return render(request, "compare.html", a=a, b=b, d=d, timing=d.targets.timing[:COMPARE_ROWS],
                  more_timing=max(0, len(d.targets.timing) - COMPARE_ROWS))


async def login_form(request: web.Request) -> web.Response:
    return render(request, "login.html", next=_safe_next(request.query.get("next")), error=None)


async def login(request: web.Request) -> web.Response:
    form = await request.post()
    key = str(form.get("key", "")).strip()
    target_path = _safe_next(str(form.get("next", "/")))
    try:
        await _backend(request).authorize(f"Bearer {key}", "read")
    except (Unauthorized, Forbidden) as exc:
        return render(request, "login.html", status=401, next=target_path, error=str(exc))
    resp = web.HTTPSeeOther(target_path)
    secure = request.secure or request.headers.get("X-Forwarded-Proto") == "https"
    resp.set_cookie(COOKIE, key, httponly=True, samesite="Strict", secure=secure, path="/", max_age=30 * 86_400)
    raise resp


async def logout(request: web.Request) -> web.Response:
    resp = web.HTTPSeeOther("/login")
    resp.del_cookie(COOKIE, path="/")
    raise resp


def _safe_next(text: str | None) -> str:
    """Only a path of this site: never ``//host`` or a scheme (an open redirect)."""
    if not text or not text.startswith("/") or text.startswith("//") or "\\" in text:
        return "/"
    return text


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", overview)
    app.router.add_get("/sessions", sessions)
    app.router.add_get("/sessions/{id}", session)
    app.router.add_get("/targets/{name:.+}", target)
    app.router.add_get("/tests", tests_index)
    app.router.add_get("/tests/{name:.+}", test_page)
    app.router.add_get("/alerts", alerts)
    app.router.add_get("/compare/{a}/{b}", compare)
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_static("/static/", STATIC, append_version=False)
