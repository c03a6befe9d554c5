"""The subscriptions file: TOML decoded into structs, errors naming the key or line, http(s) only,
a warning for a file others may read, secrets kept out of what is shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from buildtel.services.notifier.config import ConfigError, load
from tests.notifier.conftest import make_alert

GOOD = """
[[subscription]]
id = "hook"
kind = "webhook"
url = "https://ci.example.com/hooks/x?token=abc"
secret_env = "HOOK_SECRET"
branches = ["release/*"]

[[subscription]]
id = "chat"
kind = "slack"
url = "https://hooks.slack.com/services/T0/B0/SECRETPART"
"""


def _write(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    p = tmp_path / "alerts.toml"
    p.write_text(text)
    p.chmod(mode)
    return p


def test_a_good_file_loads_and_never_shows_a_secret(tmp_path: Path) -> None:
    loaded = load(_write(tmp_path, GOOD), {"HOOK_SECRET": "very-secret"})
    assert [s.id for s in loaded.subscriptions] == ["hook", "chat"] and not loaded.warnings
    assert loaded.secrets == {"hook": b"very-secret"}
    shown = repr(loaded) + repr(loaded.describe())
    assert "very-secret" not in shown and "SECRETPART" not in repr(loaded.describe())
    assert "token=abc" not in repr(loaded.describe())
    assert loaded.describe()[0]["url"] == "https://ci.example.com/…"


def test_a_file_others_may_read_loads_with_a_warning(tmp_path: Path) -> None:
    loaded = load(_write(tmp_path, GOOD, 0o644), {"HOOK_SECRET": "x"})
    assert loaded.warnings and "readable by others" in loaded.warnings[0] and "chmod 600" in loaded.warnings[0]


@pytest.mark.parametrize(("text", "names"), [
    ('[[subscription]]\nid = "a"\nkind = "webhook"\nurl = 5\n', "$.subscription[0].url"),
    ('[[subscription]]\nid = "a"\nkind = "email"\n', "$.subscription[0].kind"),
    ('[[subscription]]\nid = "a"\nkind = "slack"\nurl = "x"\ncolour = 1\n', "colour"),
    ('[[subscription]]\nid = "a"\nkind = "slack"\nurl = "ftp://x.example/"\n', "subscription 'a'.url"),
    ('[[subscription]]\nid = "a"\nkind = "slack"\nurl = "file:///etc/passwd"\n', "subscription 'a'.url"),
    ('[[subscription]]\nid = "a"\nkind = "webhook"\nurl = "https://x.example/"\n', "subscription 'a'.secret"),
    ('[[subscription]]\nid = "a"\nkind = "nats"\nsubject = "x.>"\n', "subscription 'a'.subject"),
    ('[[subscription]]\nid = "a b"\nkind = "nats"\nsubject = "x"\n', "subscription[0].id"),
    ('[[subscription]]\nid = "a"\nkind = "nats"\nsubject = "x"\nmin_confidence = 2\n', "min_confidence"),
    ('[delivery]\nlease_s = 1\ntimeout_s = 5\n', "delivery.lease_s"),
    ('[[subscription]]\nid = "a"\nkind = "nats"\nsubject = "x"\nsecret_env = "NOPE"\n', "NOPE is not set"),
    ('[[subscription]\nid = "a"\n', "line 1"),
])
def test_errors_name_the_key_or_line(tmp_path: Path, text: str, names: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(_write(tmp_path, text), {})
    assert names in str(err.value) and "alerts.toml" in str(err.value)


def test_rules_match_as_documented(tmp_path: Path) -> None:
    loaded = load(_write(tmp_path, '[[subscription]]\nid = "a"\nkind = "nats"\nsubject = "x"\n'
                                   'branches = ["*"]\ntargets = ["//app/*"]\n'), {})
    [sub] = loaded.subscriptions
    assert sub.matches(make_alert(branch=None, target="//app/x:y"), "ns")  # "*" matches no branch
    assert not sub.matches(make_alert(kind="build"), "ns")  # a target rule never matches a build alert
    assert not sub.matches(make_alert(target="//lib:y"), "ns")
