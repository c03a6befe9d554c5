"""Least-privilege roles on the bus and authenticated engines, against real servers.

Each test starts its own nats-server / redis-server (the embedded default, with fresh
credentials) so the namespace scoping is the one a real stack has.  A denied publish or
subscription is an error the client sees (the server's "Permissions Violation"), never a
silent drop; an allowed one is received by an operator subscriber.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import nats.errors
import pytest
import redis

from buildtel.shared import bigmsg
from buildtel.shared.auth import ROLES, StackAuth, inbox_prefix
from buildtel.shared.bus import ensure_streams, flush
from buildtel.shared.codec import encode
from buildtel.shared.engines import NatsEngine, RedisEngine
from buildtel.shared.protocol import BuildSession, new_session_id
from buildtel.shared.subjects import Subjects

# The module's own server (the engine fixture): a fixed namespace, so the parameter ids that
# name subjects are the same in every process (pytest-xdist compares the collections).
NS = "farmroles"
BUCKET = Subjects(NS).sessions_bucket  # sessions over one message (shared/bigmsg.py)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsEngine]:
    with NatsEngine(tmp_path_factory.mktemp("roles") / "nats", namespace=NS) as eng:
        yield eng


class Conn:
    """A connection as one role that records the server's permission errors."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.errors: list[str] = []
        self.nc: nats.NATS | None = None

    async def open(self, eng: NatsEngine) -> Conn:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        self.nc = await nats.connect(eng.url, user=self.role, password=eng.auth.password(self.role),
                                     inbox_prefix=inbox_prefix(self.role), error_cb=on_error,
                                     allow_reconnect=False, connect_timeout=5)
        return self

    async def denied(self, what: str, subject: str) -> bool:
        """Wait (bounded) for the server's refusal of ``what`` ("Publish"/"Subscription") on ``subject``."""
        needle = f"permissions violation for {what} to \"{subject}\"".lower()
        for _ in range(400):
            if any(needle in e.lower() for e in self.errors):
                return True
            await asyncio.sleep(0.025)
        return False


@pytest.fixture
async def conns(engine: NatsEngine) -> AsyncIterator[dict[str, Conn]]:
    out = {role: await Conn(role).open(engine) for role in ROLES}
    try:
        yield out
    finally:
        for c in out.values():
            if c.nc is not None:
                await c.nc.close()


async def _publish_reaches_operator(conns: dict[str, Conn], role: str, subject: str, wait: float = 20.0) -> bool:
    op = conns["operator"].nc
    assert op is not None
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def cb(msg: nats.aio.msg.Msg) -> None:
        await got.put(msg.data)

    sub = await op.subscribe(subject, cb=cb)
    await flush(op)
    nc = conns[role].nc
    assert nc is not None
    try:
        # Published again each second until seen (bounded): a permitted subject is delivered on the
        # first try on an idle machine; the repeat only keeps a loaded one from failing the test.
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            await nc.publish(subject, b"probe")
            await flush(nc)
            try:
                return await asyncio.wait_for(got.get(), min(1.0, wait)) == b"probe"
            except TimeoutError:
                if asyncio.get_running_loop().time() >= deadline:
                    return False
    finally:
        await sub.unsubscribe()


@pytest.mark.parametrize(("role", "subject"), [
    ("agent", f"{NS}.events.0123456789abcdef0123456789abcdef"),
    ("agent", f"{NS}.health.0123456789abcdef0123456789abcdef"),
    ("collector", f"{NS}.sessions.completed"),
    ("collector", f"{NS}.deadletter.collector"),
    ("collector", f"$O.{BUCKET}.C.chunk"),
    ("analyzer", f"{NS}.alerts.target.main.cc"),
    ("reader", f"{NS}.storage.get"),
    ("reader", f"{NS}.analyzer.report"),
    ("storage", f"{NS}.deadletter.storage"),
    ("tracer", f"{NS}.storage.get"),
    ("recorder", f"{NS}.deadletter.recorder"),
    *(("web", f"{NS}.recorder.{ep}") for ep in ("list", "get", "events", "diff")),
])
async def test_a_role_may_publish_what_it_needs(conns: dict[str, Conn], role: str, subject: str) -> None:
    nc = conns[role].nc
    assert await _publish_reaches_operator(conns, role, subject), (conns[role].errors, nc and nc.is_connected)
    assert not conns[role].errors


@pytest.mark.parametrize(("role", "subject"), [
    # An agent can neither forge history nor alerts nor dead letters, nor write another namespace.
    ("agent", f"{NS}.sessions.completed"),
    ("agent", f"{NS}.alerts.build.main._"),
    ("agent", f"{NS}.deadletter.collector"),
    ("agent", "otherfarm.events.0123456789abcdef0123456789abcdef"),
    ("agent", f"{NS}.storage.get"),
    ("agent", "$JS.API.STREAM.DELETE." + Subjects(NS).events_stream),
    ("reader", f"{NS}.events.0123456789abcdef0123456789abcdef"),
    ("reader", f"{NS}.sessions.completed"),
    ("reader", "$JS.API.STREAM.DELETE." + Subjects(NS).sessions_stream),
    ("collector", f"{NS}.alerts.build.main._"),
    ("storage", f"{NS}.sessions.completed"),
    ("analyzer", f"{NS}.events.0123456789abcdef0123456789abcdef"),
    ("tracer", f"{NS}.sessions.completed"),
    ("recorder", f"{NS}.deadletter.collector"),
    # The web role may ask the recorder's read endpoints, nothing else of it; others not even those.
    ("web", f"{NS}.recorder.delete"),
    ("reader", f"{NS}.recorder.list"),
    ("agent", f"{NS}.recorder.get"),
    # Only the producers write the bucket of large sessions; its readers only read it.
    ("agent", f"$O.{BUCKET}.C.chunk"),
    ("agent", f"$O.{BUCKET}.M.meta"),
    ("agent", f"$JS.API.DIRECT.GET.OBJ_{BUCKET}"),
    ("reader", f"$O.{BUCKET}.C.chunk"),
    ("reader", f"$JS.API.DIRECT.GET.OBJ_{BUCKET}"),
    ("storage", f"$O.{BUCKET}.C.chunk"),
    ("analyzer", f"$O.{BUCKET}.M.meta"),
    ("tracer", f"$O.{BUCKET}.C.chunk"),
    ("storage", f"$JS.API.STREAM.PURGE.OBJ_{BUCKET}"),
    # The web service follows the sessions stream but can neither write it nor touch the durable
    # consumers of the services that store and analyze it (no ack, delete, durable create, fetch).
    ("agent", f"{NS}.sessions.started"),
    ("web", f"{NS}.sessions.completed"),
    ("web", f"{NS}.sessions.started"),
    ("web", f"$JS.API.CONSUMER.DELETE.{Subjects(NS).sessions_stream}.storage"),
    ("web", f"$JS.API.CONSUMER.DURABLE.CREATE.{Subjects(NS).sessions_stream}.storage"),
    ("web", f"$JS.API.CONSUMER.CREATE.{Subjects(NS).sessions_stream}.storage.{NS}.sessions.completed"),
    ("web", f"$JS.API.CONSUMER.MSG.NEXT.{Subjects(NS).sessions_stream}.storage"),
    ("web", f"$JS.ACK.{Subjects(NS).sessions_stream}.storage.1.7.7.0.0"),
    ("web", f"$O.{BUCKET}.C.chunk"),
])
async def test_a_role_may_not_publish_the_rest(conns: dict[str, Conn], role: str, subject: str) -> None:
    assert await conns[role].denied("Publish", subject) if not await _publish_reaches_operator(
        conns, role, subject, wait=1.0) else False, f"{role} could publish to {subject}"


@pytest.mark.parametrize(("role", "subject"), [
    ("agent", "_INBOX.agent.x1"),
    ("storage", f"{NS}.storage.get"),
    ("analyzer", f"{NS}.analyzer.report"),
    ("tracer", f"{NS}.traces.get"),
    ("recorder", f"{NS}.recorder.get"),
    ("reader", f"{NS}.health.0123456789abcdef0123456789abcdef"),
    ("reader", "_INBOX.reader.x1"),
])
async def test_a_role_may_subscribe_to_what_it_needs(conns: dict[str, Conn], role: str, subject: str) -> None:
    nc, op = conns[role].nc, conns["operator"].nc
    assert nc is not None and op is not None
    sub = await nc.subscribe(subject)
    await flush(nc)
    for _ in range(20):  # bounded; repeated so a loaded machine cannot fail it
        await op.publish(subject, b"probe")
        await flush(op)
        try:
            assert (await sub.next_msg(timeout=1.0)).data == b"probe"
            break
        except nats.errors.TimeoutError:
            continue
    else:
        raise AssertionError(f"{role} received nothing on {subject}: {conns[role].errors}")
    assert not conns[role].errors


@pytest.mark.parametrize(("role", "subject"), [
    ("agent", f"{NS}.events.>"),
    ("agent", ">"),
    ("agent", "_INBOX.>"),
    ("agent", "_INBOX.reader.>"),
    ("agent", f"{NS}.health.*"),
    ("reader", f"{NS}.events.>"),
    ("reader", f"{NS}.sessions.completed"),
    ("reader", "_INBOX.storage.>"),
    ("collector", f"{NS}.storage.>"),
    ("storage", f"{NS}.events.>"),
])
async def test_a_role_may_not_subscribe_beyond_its_needs(conns: dict[str, Conn], role: str, subject: str) -> None:
    nc = conns[role].nc
    assert nc is not None
    await nc.subscribe(subject)
    await flush(nc)
    assert await conns[role].denied("Subscription", subject)


async def test_the_web_role_can_request_the_recorder_endpoints(conns: dict[str, Conn]) -> None:
    """A request of the web role reaches a responder of the recorder role, and its reply comes back
    to the web role's inbox (allow_responses), for each of the endpoints the web API uses."""
    recorder, web = conns["recorder"].nc, conns["web"].nc
    assert recorder is not None and web is not None

    async def answer(msg: nats.aio.msg.Msg) -> None:
        await msg.respond(b"reply to " + msg.subject.encode())

    sub = await recorder.subscribe(f"{NS}.recorder.>", queue="q", cb=answer)
    # The bus's flush, not nc.flush(): nats-py writes flush's PING ahead of the queued SUB, so the
    # PONG could come back before the server had the subscription — "no responders" in loaded runs.
    await flush(recorder)
    try:
        for ep in ("list", "get", "events", "diff"):
            try:
                reply = await web.request(f"{NS}.recorder.{ep}", b"{}", timeout=10)
            except nats.errors.NoRespondersError:  # say what each side had
                pytest.fail(f"no responder for {ep}: recorder connected={recorder.is_connected} "
                            f"errors={conns['recorder'].errors}; web connected={web.is_connected} "
                            f"errors={conns['web'].errors}")
            assert reply.data == f"reply to {NS}.recorder.{ep}".encode()
    finally:
        await sub.unsubscribe()
    assert not conns["recorder"].errors and not conns["web"].errors


async def test_a_forged_session_from_an_agent_never_reaches_history(conns: dict[str, Conn]) -> None:
    op, agent = conns["operator"].nc, conns["agent"].nc
    assert op is not None and agent is not None
    subjects = Subjects(NS)
    await ensure_streams(op.jetstream(), subjects)
    before = (await op.jetstream().stream_info(subjects.sessions_stream)).state.messages
    forged = BuildSession(id=new_session_id(), name="forged", start=1.0, finish=2.0, duration_s=1.0)
    with pytest.raises(Exception):  # noqa: B017 - refused: a permissions error or no acknowledgement
        await agent.jetstream(timeout=2).publish(subjects.sessions_completed, encode(forged))
    assert await conns["agent"].denied("Publish", subjects.sessions_completed)
    assert (await op.jetstream().stream_info(subjects.sessions_stream)).state.messages == before
    # While the agent's own events are stored and acknowledged.
    ack = await agent.jetstream(timeout=5).publish(subjects.events(new_session_id()), b"\x80")
    assert ack.stream == subjects.events_stream


async def test_the_web_role_follows_sessions_the_collector_announces_and_cannot_forge_them(
        conns: dict[str, Conn]) -> None:
    from nats.js.api import DeliverPolicy

    from buildtel.shared.protocol import SessionStarted

    op, collector, web = (conns[r].nc for r in ("operator", "collector", "web"))
    assert op is not None and collector is not None and web is not None
    subjects = Subjects(NS)
    await ensure_streams(op.jetstream(), subjects)
    sid = new_session_id()
    await collector.jetstream(timeout=5).publish(subjects.sessions_started, encode(SessionStarted(id=sid)),
                                                 headers={"Nats-Msg-Id": f"{sid}.started"})
    sub = await web.jetstream(timeout=5).subscribe(subjects.sessions_all, stream=subjects.sessions_stream,
                                                   ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    seen = []
    while sid.encode() not in b"".join(seen):
        seen.append((await sub.next_msg(timeout=10)).data)
    await sub.unsubscribe()
    before = (await op.jetstream().stream_info(subjects.sessions_stream)).state.messages
    with pytest.raises(Exception):  # noqa: B017 - refused: a permissions error or no acknowledgement
        await web.jetstream(timeout=2).publish(subjects.sessions_started, encode(SessionStarted(id=sid[::-1])))
    assert await conns["web"].denied("Publish", subjects.sessions_started)
    assert (await op.jetstream().stream_info(subjects.sessions_stream)).state.messages == before
    assert not [e for e in conns["collector"].errors if "sessions" in e]


async def test_only_producers_write_the_large_session_bucket_and_consumers_read_it(conns: dict[str, Conn]) -> None:
    op, collector, storage, agent = (conns[r].nc for r in ("operator", "collector", "storage", "agent"))
    assert op is not None and collector is not None and storage is not None and agent is not None
    subjects = Subjects(NS)
    await ensure_streams(op.jetstream(), subjects)
    stream = bigmsg.object_stream(BUCKET)
    data = bytes(range(256)) * 12_000  # 3 MB: three chunks
    ref = await bigmsg.put(collector.jetstream(timeout=5), BUCKET, data)
    assert await bigmsg.resolve(storage.jetstream(timeout=5), ref, expected_bucket=BUCKET) == data
    before = (await op.jetstream().stream_info(stream)).state.messages
    with pytest.raises(Exception):  # noqa: B017 - refused: a permissions error or no acknowledgement
        await bigmsg.put(storage.jetstream(timeout=2), BUCKET, b"forged by a reader" * 1000)
    with pytest.raises(Exception):  # noqa: B017 - the agent may not even read it
        await bigmsg.resolve(agent.jetstream(timeout=2), ref, expected_bucket=BUCKET)
    with pytest.raises(Exception):  # noqa: B017
        await agent.jetstream(timeout=2).publish(bigmsg.chunk_subject(BUCKET, "forged"), b"x")
    assert (await op.jetstream().stream_info(stream)).state.messages == before


async def test_connections_without_the_stack_credentials_are_refused(engine: NatsEngine) -> None:
    for creds in ({}, {"user": "agent", "password": "guess"}, {"token": "guess"}):
        nc = nats.NATS()
        try:
            with pytest.raises(Exception, match="Authorization Violation"):
                await nc.connect(engine.url, allow_reconnect=False, connect_timeout=5, max_reconnect_attempts=0,
                                 **creds)
        finally:
            await nc.close()  # a refused connect leaves its socket to the caller


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_redis_needs_its_password_and_cannot_reach_outside_its_data(tmp_path: Path) -> None:
    with RedisEngine(tmp_path / "redis") as eng:
        anonymous = redis.Redis(host=eng.host, port=eng.port)
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        anonymous.close()
        r = redis.Redis.from_url(eng.url)
        assert r.ping()
        # The attack: point the dump file at another user's ~/.ssh and SAVE. Refused.
        for argv in (("CONFIG", "SET", "dir", str(tmp_path)), ("CONFIG", "GET", "*"), ("DEBUG", "SLEEP", "0"),
                     ("MODULE", "LIST"), ("REPLICAOF", "127.0.0.1", "1"), ("SLAVEOF", "127.0.0.1", "1"),
                     ("ACL", "SETUSER", "default", "+config")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                r.execute_command(*argv)
        r.close()
        assert eng.proc is not None and eng.auth.redis_password not in _cmdline(eng.proc.pid)


def test_engine_secrets_are_in_private_files_not_in_process_arguments(tmp_path: Path) -> None:
    auth = StackAuth.generate()
    old = os.umask(0)  # a permissive umask changes nothing
    try:
        with NatsEngine(tmp_path / "nats", auth=auth) as n, RedisEngine(tmp_path / "redis", auth=auth) as r:
            for eng in (n, r):
                assert eng.proc is not None
                cmd = _cmdline(eng.proc.pid)
                assert all(pw not in cmd for _, pw in auth.nats) and auth.redis_password not in cmd
            for path in [tmp_path / "nats", tmp_path / "redis", *(tmp_path / "nats").rglob("*"),
                         *(tmp_path / "redis").rglob("*")]:
                mode = path.stat().st_mode & 0o777
                assert mode & 0o077 == 0, f"{path} is {oct(mode)}"
            assert (tmp_path / "nats" / "nats.conf").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
