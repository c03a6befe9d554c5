"""Secrets never leave the agent: names and values that look secret are redacted, the rest kept."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from buildtel.shared.environment import capture
from buildtel.shared.redaction import REDACTED, redact_argv, redact_env


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
              "-----BEGIN RSA PRIVATE KEY-----", "Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFiY2RlZmdoaWprbG1u"]
    env = {f"SOMETHING_{i}": v for i, v in enumerate(values)}
    assert set(redact_env(env).values()) == {REDACTED}


def test_urls_lose_their_credentials_and_keep_the_rest() -> None:
    env = {"REPO": "https://deploy:hunter22@example.com/repo.git", "MIRROR": "https://:hunter22@example.com/m",
           "ORIGIN": "https://ghp_x1@github.com/o/r", "SSH": "ssh://git@github.com/o/r.git",
           "PROXY": "http://u:pw@proxy:3128", "SCOPED": "https://unpkg.com/@babel/core@7.0.0"}
    assert redact_env(env) == {"REPO": f"https://{REDACTED}@example.com/repo.git",
                               "MIRROR": f"https://{REDACTED}@example.com/m",
                               "ORIGIN": f"https://{REDACTED}@github.com/o/r", "SSH": "ssh://git@github.com/o/r.git",
                               "PROXY": f"http://{REDACTED}@proxy:3128", "SCOPED": "https://unpkg.com/@babel/core@7.0.0"}


def test_webhook_and_trigger_urls_lose_their_secret() -> None:
    argv = ["notify", "https://hooks.slack.com/services/T0/B0/XyZ", "https://discord.com/api/webhooks/1/AbC",
            "https://chat.example.com/hooks/abc123", "https://acme.webhook.office.com/webhookb2/g@t/IncomingWebhook/a/b",
            "https://gitlab.com/api/v4/projects/7/trigger/pipeline?token=tk1&ref=main",
            "https://ci.example.com/job/app/build?token=tk2#access_token=tk3"]
    assert redact_argv(argv) == [
        "notify", f"https://hooks.slack.com/services/{REDACTED}", f"https://discord.com/api/webhooks/{REDACTED}",
        f"https://chat.example.com/hooks/{REDACTED}", f"https://acme.webhook.office.com/webhookb2/{REDACTED}",
        f"https://gitlab.com/api/v4/projects/7/trigger/pipeline?token={REDACTED}&ref=main",
        f"https://ci.example.com/job/app/build?token={REDACTED}#access_token={REDACTED}"]


def test_command_line_secrets_are_redacted() -> None:
    argv = ["deploy", "--token=abc", "--password", "hunter2", "--name", "x", "AKIAIOSFODNN7EXAMPLE", "-j8",
            "DB_PASSWORD=pw", "--env=API_TOKEN=t", "-H", "Authorization: Bearer abcdefgh1", "-F", "token=t2",
            "sh -c 'make NPM_TOKEN=t3 && deploy --password t4'"]
    assert redact_argv(argv) == ["deploy", f"--token={REDACTED}", "--password", REDACTED, "--name", "x",
                                 REDACTED, "-j8", f"DB_PASSWORD={REDACTED}", f"--env=API_TOKEN={REDACTED}", "-H",
                                 f"Authorization: Bearer {REDACTED}", "-F", f"token={REDACTED}",
                                 f"sh -c 'make NPM_TOKEN={REDACTED} && deploy --password {REDACTED}'"]


def test_make_variables_in_makeflags_are_redacted_word_by_word() -> None:
    flags = " -j8 --jobserver-auth=3,4 -- DB_PASSWORD=a\\ b CFLAGS=-O2"
    assert redact_env({"MAKEFLAGS": flags}) == {
        "MAKEFLAGS": f" -j8 --jobserver-auth=3,4 -- DB_PASSWORD={REDACTED} CFLAGS=-O2"}


def test_ordinary_command_lines_are_kept_verbatim() -> None:
    argv = ["cc", "-O2", "-Wall", "-DFOO=1", "-I/usr/include", "-std=c++17", "-o", "out/a.o", "src/a.c", "a" * 40,
            "make", "-C", "build", "-j8", "PREFIX=/usr/local", "CFLAGS=-O2 -g", "ninja", "-t", "targets",
            "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01", "123e4567-e89b-12d3-a456-426614174000",
            "git@github.com:o/r.git"]
    assert redact_argv(argv) == argv


def test_captured_environment_carries_no_secret_value() -> None:
    env = capture(environ={"MY_API_TOKEN": "s3cr3t-value", "PATH": "/usr/bin"}, tools=())
    assert env.env == {"MY_API_TOKEN": REDACTED, "PATH": "/usr/bin"}
    assert env.cpus > 0 and env.hostname


@given(st.dictionaries(st.text(max_size=30), st.text(max_size=80), max_size=20))
def test_redaction_keeps_every_name_and_never_invents_values(env: dict[str, str]) -> None:
    out = redact_env(env)
    assert out.keys() == env.keys()
    assert all(v == env[k] or REDACTED in v for k, v in out.items())


def test_imported_sessions_carry_a_redacted_command() -> None:
    from buildtel.shared.importers.common import make_session

    s = make_session(session_id="ab" * 16, name="bazel", start=0.0, finish=1.0, targets=[], events=0, agent="import",
                     outcome="unknown",
                     command=["bazel", "build", "--remote_header=Authorization=Bearer abcdefgh12", "//..."])
    assert "abcdefgh12" not in repr(s.command) and s.command[:2] == ["bazel", "build"] and s.command[-1] == "//..."
