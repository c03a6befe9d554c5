"""``buildtel trace`` and ``trace export`` take the CLI's one id grammar (cli/ids.py):
a unique prefix of a session or trace id, ``last`` and ``last~N`` (stored sessions)."""

from __future__ import annotations

import json

from buildtel.services.storage.api import StorageClient
from buildtel.shared.subjects import Subjects
from tests.tracer.helpers import eventually
from tests.tracer.test_cli_trace import _buildtel, _stored_session


async def test_trace_by_prefix_last_and_last_tilde(tracer, client, nc, settings, storage, tmp_path) -> None:
    first = await _stored_session(tracer, client, nc, settings)
    second = await _stored_session(tracer, client, nc, settings)
    storage_client = StorageClient(nc, Subjects(settings.namespace))

    stored = await eventually(lambda: storage_client.recent(5), ok=lambda found: len(found) == 2)
    newest = stored[0].id
    older = first if newest == second else second
    for word, expected in ((first[:8], first), (second[:10].upper(), second), ("last", newest), ("last~1", older)):
        code, out, err = await _buildtel(settings, "trace", word, "--json")
        assert code == 0, (word, err)
        assert json.loads(out)["trace_id"] == expected, word
    path = tmp_path / "t.json"
    code, out, err = await _buildtel(settings, "trace", "export", "last", "--jaeger-file", str(path), "--json")
    assert code == 0, err
    assert json.loads(out) == {"trace_id": newest, "session_ids": [newest], "spans": 6,
                               "jaeger_file": str(path), "chrome_trace": None, "sent_to": []}
    code, out, err = await _buildtel(settings, "trace", "0f0f0f0f")
    assert (code, out) == (2, "")
    assert err.strip() == "buildtel: error: no session or trace id starts with 0f0f0f0f"
    code, _, err = await _buildtel(settings, "trace", "last~2")
    assert err.strip() == "buildtel: error: only 2 sessions are stored: last~2 needs 3"
