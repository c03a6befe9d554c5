"""Property tests of buildtel.shared.redaction: a generated secret put in any position a build command or
environment can carry it never survives redaction, and ordinary values pass unchanged."""

from __future__ import annotations

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from buildtel.shared.codec import decode_batch, encode
from buildtel.shared.protocol import BuildEnvironment, BuildStarted, EventBatch, VcsInfo
from buildtel.shared.redaction import REDACTED, redact_argv, redact_batch, redact_env, redact_started, redact_text

# What a secret may contain in every position below (no '/', '?', '#', '@' or whitespace: those
# would end a URL's user-info or a word, and the secret would then not be in that position).
SECRET = st.from_regex(r"[A-Za-z0-9]{3}[A-Za-z0-9._~+=-]{5,30}", fullmatch=True)
NAME = st.builds(lambda pre, word, post: f"{pre}{word}{post}",
                 st.sampled_from(["", "MY_", "CI_", "npm_", "DEPLOY_", "x."]),
                 st.sampled_from(["TOKEN", "SECRET", "PASSWORD", "PASSWD", "API_KEY", "apikey", "PASS",
                                  "CREDENTIALS", "AUTH", "COOKIE", "PRIVATE_KEY", "SIGNATURE", "DSN"]),
                 st.sampled_from(["", "_VALUE", "_1", "-file"]))

# One template per position; {s} is where the secret goes, {n} a sensitive name.
URL_POSITIONS = [
    "https://{s}@github.com/org/repo.git",                    # user-only token
    "https://:{s}@example.com/repo.git",                      # empty user name
    "https://deploy:{s}@example.com:8443/repo.git",
    "https://{s}:x-oauth-basic@github.com/org/repo",          # token in the user position
    "postgres://app:{s}@db.internal:5432/app",
    "ssh://git:{s}@git.example.com/repo.git",
    "https://example.com/download?ref=main&{n}={s}",
    "https://example.com/cb#state=1&access_token={s}",
    "https://files.example.com/blob?sv=2022&sp=r&sig={s}",
    "https://hooks.slack.com/services/T01ABC/B02DEF/{s}",
    "https://hooks.slack.com/workflows/T01ABC/A02/123/{s}",
    "https://discord.com/api/webhooks/1234567890/{s}",
    "https://discordapp.com/api/v10/webhooks/1234567890/{s}",
    "https://chat.example.com/hooks/{s}",
    "https://acme.webhook.office.com/webhookb2/{s}@tenant/IncomingWebhook/abc/def",
    "https://gitlab.example.com/api/v4/projects/42/trigger/pipeline?token={s}&ref=main",
    "https://ci.example.com/job/app/build?token={s}",
    "https://ci.example.com/buildByToken/build?job=app&token={s}",
    "https://maker.ifttt.com/trigger/built/with/key/{s}",
]
WORD_POSITIONS = [
    "--{n}={s}", "--{n}", "{n}={s}", "-D{n}={s}", "--env={n}={s}", "--build-arg={n}={s}",
    "EXTRA_ARGS=--{n}", "--args=--{n}", "Authorization: Bearer {s}", "Authorization: token {s}", "{n}: {s}", "{n}:{s}",
]


def _render(template: str, name: str, secret: str) -> str:
    return template.replace("{n}", name).replace("{s}", secret)


@settings(max_examples=300)
@given(st.sampled_from(URL_POSITIONS), NAME, SECRET, st.sampled_from(["env", "argv", "assign", "sh", "option"]))
def test_a_secret_in_a_url_never_survives(template: str, name: str, secret: str, where: str) -> None:
    url = _render(template, name, secret)
    assume(secret not in _render(template, name, ""))  # the secret is only where it was put
    if where == "env":
        out = repr(redact_env({"SOME_URL": url, "OTHER": f"git clone {url} dir"}))
    elif where == "argv":
        out = repr(redact_argv(["git", "clone", url, "dir"]))
    elif where == "assign":
        out = repr(redact_argv(["make", f"REPO_URL={url}", f"--url={url}"]))
    elif where == "sh":
        out = repr(redact_argv(["sh", "-c", f"curl -fsS '{url}' && echo done"]))
    else:
        out = repr(redact_argv(["tool", "--endpoint", url]))
    assert secret not in out
    assert REDACTED in out
    host = url.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    assert host in out  # only the secret goes: where the URL points stays readable


@settings(max_examples=300)
@given(st.sampled_from(WORD_POSITIONS), NAME, SECRET, st.sampled_from(["argv", "sh", "env", "makeflags"]))
def test_a_secret_named_on_a_command_line_never_survives(template: str, name: str, secret: str, where: str) -> None:
    words = _render(template, name, secret).split(" ")
    if "{s}" not in template:  # "--password X": the value is the next word
        words.append(secret)
    assume(secret.lower() not in {"bearer", "basic", "token", "digest"})
    if where == "argv":
        out = repr(redact_argv(["deploy", *words, "--verbose"]))
    elif where == "sh":
        out = repr(redact_argv(["sh", "-c", "deploy " + " ".join(words) + " && echo ok"]))
    elif where == "env":
        out = repr(redact_env({"DEPLOY_ARGS": " ".join(words)}))
    else:
        out = repr(redact_env({"MAKEFLAGS": " -j8 -- " + " ".join(w.replace(" ", "\\ ") for w in words)}))
    assert secret not in out
    assert REDACTED in out


@given(NAME, SECRET)
def test_a_variable_whose_name_says_secret_is_redacted_whatever_its_value(name: str, secret: str) -> None:
    assert redact_env({name: secret, "PATH": "/usr/bin"}) == {name: REDACTED, "PATH": "/usr/bin"}


@given(SECRET, SECRET, SECRET)
def test_received_build_started_is_redacted_and_re_encoded(s1: str, s2: str, s3: str) -> None:
    """What an agent that forgot to redact sends: the bytes kept carry none of its secrets."""
    ev = BuildStarted(session_id="ab" * 16, agent_id="foreign", seq=0, ts=1.0,
                      command=["deploy", "--token", s1, f"DB_PASSWORD={s2}"],
                      environment=BuildEnvironment(env={"API_TOKEN": s3, "PATH": "/bin"},
                                                   vcs=VcsInfo(commit="a" * 40, remote=f"https://u:{s1}@git.example/r")))
    data = encode(EventBatch(session_id="ab" * 16, agent_id="foreign", events=[ev]))
    batch = decode_batch(data)
    kept = redact_batch(batch, data)
    for s in (s1, s2, s3):
        assert s.encode() not in kept
    [again] = decode_batch(kept).events
    assert isinstance(again, BuildStarted)
    assert again.command == ["deploy", "--token", REDACTED, f"DB_PASSWORD={REDACTED}"]
    assert again.environment is not None and again.environment.env == {"API_TOKEN": REDACTED, "PATH": "/bin"}
    assert again.environment.vcs is not None and again.environment.vcs.remote == f"https://{REDACTED}@git.example/r"
    assert redact_batch(decode_batch(kept), kept) is kept  # nothing left to redact: the same bytes
    assert redact_started(again) == again


# -- ordinary values pass unchanged -------------------------------------------------------------
PATH = st.from_regex(r"(/|\./|\.\./)?[a-z0-9_]{1,12}(/[a-z0-9_.+-]{1,16}){0,5}", fullmatch=True)
HASH = st.one_of(st.from_regex(r"[0-9a-f]{40}", fullmatch=True), st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
                 st.from_regex(r"[0-9a-f]{7,12}", fullmatch=True))
FLAG = st.one_of(
    st.sampled_from(["-O0", "-O2", "-O3", "-Os", "-g", "-Wall", "-Wextra", "-Werror", "-pedantic", "-fPIC",
                     "-std=c++17", "-std=c11", "-pthread", "-MMD", "-MP", "-c", "-o", "-j8", "-k", "-C", "--build",
                     "-v", "--", "-lm", "-shared", "-march=native", "--verbose", "-Wl,--as-needed"]),
    st.builds(lambda n, v: f"-D{n}={v}", st.from_regex(r"[A-Z][A-Z0-9_]{0,10}", fullmatch=True)
              .filter(lambda n: not any(w in n for w in ("KEY", "PASS", "AUTH", "SIG", "DSN", "SESSION"))),
              st.from_regex(r"[0-9]{1,4}", fullmatch=True)),
    st.builds(lambda p: f"-I{p}", PATH),
)
ORDINARY_ENV = st.dictionaries(
    st.sampled_from(["PATH", "HOME", "PWD", "CC", "CXX", "CFLAGS", "LANG", "CI", "GIT_COMMIT", "BUILD_DIR",
                     "PREFIX", "JOBS", "TERM", "SHELL", "USER"]),
    st.one_of(PATH, HASH, FLAG, st.lists(FLAG, max_size=6).map(" ".join),
              st.lists(PATH, min_size=1, max_size=4).map(":".join)),
    max_size=10)


@settings(max_examples=300)
@given(st.lists(st.one_of(PATH, HASH, FLAG), max_size=20))
def test_ordinary_command_lines_pass_unchanged(argv: list[str]) -> None:
    assert redact_argv(["cc", *argv]) == ["cc", *argv]
    assert redact_text(" ".join(argv)) == " ".join(argv)


@settings(max_examples=300)
@given(ORDINARY_ENV)
def test_ordinary_environments_pass_unchanged(env: dict[str, str]) -> None:
    assert redact_env(env) == env
