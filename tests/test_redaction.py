"""Secrets never leave the agent: names and values that look secret are redacted, the rest kept."""

from __future__ import annotations

from hypothesis import given, strategies as st

from shared.environment import capture
from shared.redaction import REDACTED, redact_argv, redact_env


def test_sensitive_names_are_redacted_whatever_their_value() -> None:
    env = {name: "x" for name in ("GITHUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "MY_PASSWD", "API_KEY",
                                  "GOOGLE_APPLICATION_CREDENTIALS", "HTTP_AUTH", "SESSION_COOKIE", "NPM_PASS",
                                  "SSH_PRIVATE", "SENTRY_DSN", "gpg_passphrase")}
    assert set(redact_env(env).values()) == {REDACTED}


def test_ordinary_variables_and_paths_survive() -> None:
    env = {"PWD": "/work/repo", "OLDPWD": "/work", "PATH": "/usr/bin:/bin", "HOME": "/home/ci", "CC": "clang",
           "SSL_CERT_FILE": "/etc/ssl/certs/ca.pem", "SSH_AUTH_SOCK": "/tmp/ssh-1/agent.1", "CI": "true",
           "GIT_COMMIT": "a" * 40, "LANG": "C.UTF-8", "BUILDER_TELEMETRY_SESSION_ID": "ab" * 16}
    assert redact_env(env) == env


def test_values_that_look_like_keys_are_redacted_under_any_name() -> None:
    values = ["AKIAIOSFODNN7EXAMPLE", "ghp_" + "a1B2" * 9, "glpat-abcdefghijklmnopqrst",
              "xoxb-123456789012-abcdefghij", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.sig_nature",
              "-----BEGIN RSA PRIVATE KEY-----", "https://deploy:hunter22@example.com/repo.git",
              "Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFiY2RlZmdoaWprbG1u"]
    env = {f"SOMETHING_{i}": v for i, v in enumerate(values)}
    assert set(redact_env(env).values()) == {REDACTED}


def test_command_line_secrets_are_redacted() -> None:
    argv = ["deploy", "--token=abc", "--password", "hunter2", "--name", "x", "AKIAIOSFODNN7EXAMPLE", "-j8"]
    assert redact_argv(argv) == ["deploy", f"--token={REDACTED}", "--password", REDACTED, "--name", "x",
                                 REDACTED, "-j8"]


def test_captured_environment_carries_no_secret_value() -> None:
    env = capture(environ={"MY_API_TOKEN": "s3cr3t-value", "PATH": "/usr/bin"}, tools=())
    assert env.env == {"MY_API_TOKEN": REDACTED, "PATH": "/usr/bin"}
    assert env.cpus > 0 and env.hostname


@given(st.dictionaries(st.text(max_size=30), st.text(max_size=80), max_size=20))
def test_redaction_keeps_every_name_and_never_invents_values(env: dict[str, str]) -> None:
    out = redact_env(env)
    assert out.keys() == env.keys()
    assert all(v in (env[k], REDACTED) for k, v in out.items())
