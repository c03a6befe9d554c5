"""docker-compose.yml is valid Compose and every service it runs is a real CLI command.

No Docker engine runs here, so the file is checked against the Compose
specification's JSON schema as Docker ships it (``compose/config/compose_spec.json``
in the ``docker-compose`` 1.29.2 wheel from PyPI, fetched once with
``pip download`` into the test cache), and each container command is parsed by
the real ``buildtel`` argument parser.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml

from buildtel.cli.main import build_parser
from buildtel.services import registry

ROOT = Path(__file__).resolve().parents[2]
WHEEL = "docker-compose==1.29.2"


@pytest.fixture(scope="session")
def compose_schema(tmp_path_factory: pytest.TempPathFactory) -> dict:
    cache = ROOT / ".builder-cache" / "test-assets"
    target = cache / "compose_spec.json"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        dl = tmp_path_factory.mktemp("wheel")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", str(dl)],
                       check=True, timeout=300)
        [whl] = dl.glob("*.whl")
        with zipfile.ZipFile(whl) as z:
            target.write_bytes(z.read("compose/config/compose_spec.json"))
    return json.loads(target.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_file_is_valid_against_the_compose_spec(compose: dict, compose_schema: dict) -> None:
    validator = jsonschema.Draft201909Validator(compose_schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_a_broken_compose_file_is_rejected_by_the_same_check(compose: dict, compose_schema: dict) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["collector"]["replicas_typo"] = 2
    assert list(jsonschema.Draft201909Validator(compose_schema).iter_errors(broken))


def _ours(compose: dict) -> dict[str, dict]:
    """The containers that run the project's image: every service, storage once per partition."""
    return {name: svc for name, svc in compose["services"].items() if "command" in svc and svc.get("build")}


def test_every_service_runs_an_existing_cli_command(compose: dict) -> None:
    parser = build_parser()
    served = set()
    for name, svc in _ours(compose).items():
        args = parser.parse_args(svc["command"])
        assert args.func.__name__ == "cmd_serve"
        # storage-<k> for partition k; every other container is named after its service.
        assert name == (f"storage-{args.partition}" if args.service == "storage" else args.service)
        served.add(args.service)
    assert served == set(registry.SERVICES), "compose runs exactly the services the CLI can serve"


def test_every_storage_partition_runs_once_on_its_own_volume_and_every_service_has_the_same_count(
        compose: dict) -> None:
    parser = build_parser()
    ours = _ours(compose)
    counts = {name: svc["environment"].get("BUILDER_TELEMETRY_STORAGE_PARTITIONS") for name, svc in ours.items()}
    assert set(counts.values()) == {"3"}, f"every service must take the same partition count: {counts}"
    owned: dict[int, str] = {}
    for name, svc in ours.items():
        args = parser.parse_args(svc["command"])
        if args.service != "storage":
            continue
        assert args.partition not in owned, f"partition {args.partition}: {owned.get(args.partition)} and {name}"
        owned[args.partition] = name
    assert sorted(owned) == list(range(3))
    # Each partition's data directory is a named volume of its own: no other container mounts it.
    mounts: dict[str, list[str]] = {}
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            mounts.setdefault(vol.split(":")[0], []).append(name)
    for name in owned.values():
        [data] = [v.split(":")[0] for v in ours[name]["volumes"] if v.split(":")[1] == "/data"]
        assert data in compose["volumes"] and mounts[data] == [name], (name, data, mounts[data])


def test_image_builds_from_the_dockerfile_it_names(compose: dict) -> None:
    dockerfile = ROOT / compose["services"]["collector"]["build"]["dockerfile"]
    text = dockerfile.read_text()
    assert 'ENTRYPOINT ["buildtel"]' in text and "pip install" in text
    for path in ("pyproject.toml", "shared", "services"):
        assert (ROOT / path).exists() and path in text
