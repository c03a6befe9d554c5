"""Explained alerts as a team receives them: the webhook JSON carries the explanation, the Slack
message says "no code change between these builds", the culprit and what changed; a host
slowdown reads as the machine, not as a target."""

from __future__ import annotations

import json

from buildtel.services.analyzer.explain import (
    Culprit,
    Difference,
    Explanation,
    HostSlowdown,
    PathShift,
)
from tests.notifier.conftest import eventually, make_alert, publish, write_config


def _explained():
    a = make_alert(target="//app:lib", pct=120.0)
    a.commit_range, a.last_good_commit, a.first_bad_commit = "a1b2c3..a1b2c3", "a1b2c3", "a1b2c3"
    a.host = "agent-7"
    a.explanation = Explanation(
        summary="culprits: //app:lib +3.00s (95%); no code change between these builds; changed: EXTRA: (unset) -> 3",
        code_change=False, added_s=3.2,
        culprits=[Culprit(target="//app:lib", before_s=0.5, after_s=3.5, added_s=3.0, share=0.95,
                          on_critical_path=True)],
        critical_path=PathShift(before_s=2.0, after_s=5.0, moved=True, entered=["//app:lib"], left=["//app:gen"]),
        differences=[Difference(what="env", key="EXTRA", before=None, after="3")])
    return a


async def test_webhook_and_slack_carry_the_explanation(tmp_path, nc, settings, receiver, notifier) -> None:
    config = write_config(tmp_path, f'[[subscription]]\nid = "hook"\nkind = "webhook"\nurl = "{receiver.url("hook")}"\n'
                                    f'secret = "s3cret"\n\n[[subscription]]\nid = "chat"\nkind = "slack"\n'
                                    f'url = "{receiver.url("chat")}"\n')
    await notifier(config)
    alert = _explained()
    host = make_alert(kind="host", target=None, pct=90.0)
    host.host = "agent-7"
    host.series = "host|agent-7"
    host.explanation = Explanation(summary="most targets slowed down together (x1.90, 100% of 5 targets)",
                                   code_change=False, host_slowdown=HostSlowdown(
                                       factor=1.9, slower_share=1.0, judged=5, cpu_ratio=1.01, workers=2, cpus=2))
    await publish(nc, settings.namespace, [alert, host])
    await eventually(lambda: len(receiver.got) == 4, what="two deliveries to each subscription")
    hooks = [json.loads(r.body) for r in receiver.got if r.path.endswith("hook")]
    chats = [json.loads(r.body) for r in receiver.got if r.path.endswith("chat")]
    [e] = [h["alerts"][0]["alert"]["explanation"] for h in hooks if h["alerts"][0]["alert"]["kind"] == "target"]
    assert e["code_change"] is False and e["culprits"][0]["target"] == "//app:lib"
    assert e["culprits"][0]["share"] == 0.95 and e["critical_path"]["entered"] == ["//app:lib"]
    assert e["differences"] == [{"what": "env", "key": "EXTRA", "before": None, "after": "3"}]

    [target_msg] = [c for c in chats if "target //app:lib" in c["text"]]
    section = target_msg["blocks"][0]["text"]["text"]
    assert "no code change between these builds (commit `a1b2c3`)" in section
    assert "commits `a1b2c3..a1b2c3`" not in section
    assert "culprit //app:lib: 0.50s -&gt; 3.50s (+3.00s, 95% of the added time) on the critical path" in section
    assert "critical path moved (2.00s -&gt; 5.00s); entered: //app:lib; left: //app:gen" in section
    assert "EXTRA: (unset) -&gt; 3" in section
    [host_msg] = [c for c in chats if c is not target_msg]
    assert host_msg["text"].startswith("Regression: host agent-7 (most targets slower together)")
    assert "host slowdown: targets x1.90 their baseline (100% of 5 slower, CPU time x1.01, 2 workers on 2 CPUs)" in (
        host_msg["blocks"][0]["text"]["text"])
