"""terraform/ checked against the providers' real schemas, offline.

`terraform validate` would need the google and archive providers, which cannot be
downloaded here. tests/terraform/provider_schema.json holds, for each resource and
data source type the module uses, the schema of google and google-beta 6.50.0 and
8.7.0 (the two ends of what versions.tf admits) and archive 2.8.1, read from the
prebuilt CDK provider wheels by refresh_schema.py (its docstring says how to refresh
it). A block with `provider = google-beta` is checked against google-beta, every
other one against the provider its type name starts with.

Checked for every resource and data source, against every release of its provider:
the type exists; every argument and block written is in the schema (and settable);
every required argument and block is there; a block that may appear once appears
once; every reference `type.name.attr[...].attr` (and `self.attr` in conditions)
names an argument, attribute or block that exists.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hcl2
import pytest

from tests.terraform.refresh_schema import provider_of
from tests.terraform.test_terraform_structure import TERRAFORM_DIR, expression_parts

SCHEMA_PATH = Path(__file__).with_name("provider_schema.json")
META_ARGUMENTS = {"count", "for_each", "depends_on", "provider", "lifecycle"}
META_BLOCKS = {"lifecycle", "provisioner", "connection"}


def _unquote(key: str) -> str:
    return key[1:-1] if len(key) >= 2 and key[0] == key[-1] == '"' else key


def _keep_blocks(node: Any) -> Any:
    """Like the structure tests' cleaning, but keeps __is_block__: a block is not an argument."""
    if isinstance(node, dict):
        return {
            _unquote(key): _keep_blocks(value)
            for key, value in node.items()
            if key == "__is_block__" or not key.startswith("__")
        }
    if isinstance(node, list):
        return [_keep_blocks(item) for item in node]
    return node


Declared = dict[tuple[str, str, str], dict[str, Any]]  # (kind, type, name) -> body


def load_declared(directory: Path) -> Declared:
    declared: Declared = {}
    for path in sorted(directory.glob("*.tf")):
        with path.open(encoding="utf-8") as handle:
            parsed = _keep_blocks(hcl2.load(handle))
        for kind in ("resource", "data"):
            for entry in parsed.get(kind, []):
                for tf_type, named in entry.items():
                    for name, body in named.items():
                        declared[(kind, tf_type, name)] = body
    return declared


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    with SCHEMA_PATH.open(encoding="utf-8") as handle:
        loaded: dict[str, Any] = json.load(handle)
    return loaded


@pytest.fixture(scope="module")
def declared() -> Declared:
    return load_declared(TERRAFORM_DIR)


def _is_block(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(item, dict) and item.get("__is_block__") for item in value
    )


def _body_problems(
    where: str, body: dict[str, Any], node: dict[str, Any], top: bool = False
) -> Iterator[str]:
    """Unknown, unsettable or missing arguments and blocks of one (block) body."""
    arguments, blocks = node["arguments"], node["blocks"]
    written_blocks: dict[str, int] = {}
    for key, value in body.items():
        if key == "__is_block__":
            continue
        if key == "dynamic":
            for dynamic in value:
                for name, spec in ((k, v) for k, v in dynamic.items() if k != "__is_block__"):
                    if name not in blocks or blocks[name]["computed_only"]:
                        yield f"{where}: unknown block {name!r} (dynamic)"
                        continue
                    written_blocks[name] = written_blocks.get(name, 0) + 2  # may be many
                    for content in spec.get("content", []):
                        yield from _body_problems(f"{where}.{name}", content, blocks[name])
            continue
        if _is_block(value):
            if key in META_BLOCKS and top:
                continue
            if key not in blocks or blocks[key]["computed_only"]:
                yield f"{where}: unknown block {key!r}"
                continue
            written_blocks[key] = written_blocks.get(key, 0) + len(value)
            for item in value:
                yield from _body_problems(f"{where}.{key}", item, blocks[key])
            continue
        if key in META_ARGUMENTS and top:
            continue
        if key in blocks:
            yield f"{where}: {key!r} is a block, written as an argument"
        elif key not in arguments:
            yield f"{where}: unknown argument {key!r}"
    for name, flag in arguments.items():
        if flag == "required" and name not in body:
            yield f"{where}: required argument {name!r} missing"
    for name, spec in blocks.items():
        if spec["required"] and name not in written_blocks:
            yield f"{where}: required block {name!r} missing"
        if spec["nesting"] == "single" and written_blocks.get(name, 0) > 1:
            yield f"{where}: block {name!r} may appear only once"


def _releases(
    schema: dict[str, Any], tf_type: str, body: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    releases: dict[str, dict[str, Any]] = schema["providers"][provider_of(tf_type, body)]
    return releases


def config_problems(declared: Declared, schema: dict[str, Any]) -> list[str]:
    problems = []
    for (kind, tf_type, name), body in sorted(declared.items()):
        for release, types in _releases(schema, tf_type, body).items():
            where = f"{'data.' if kind == 'data' else ''}{tf_type}.{name} (@{release})"
            node = types[kind].get(tf_type)
            if node is None:
                problems.append(
                    f"{where}: type not in provider_schema.json (a new type? run "
                    "tests/terraform/refresh_schema.py; else it does not exist)"
                )
                continue
            problems.extend(_body_problems(where, body, node, top=True))
    return problems


# --------------------------------------------------------------------------- references

REFERENCE = re.compile(
    r"(?<![\w.])(data\.)?((?:google|archive)_\w+)\.([A-Za-z_]\w*)"
    r"((?:\[[^\]]*\])?(?:\.[A-Za-z_]\w*(?:\[[^\]]*\])?)*)"
)
SELF = re.compile(r"(?<![\w.])self((?:\.[A-Za-z_]\w*(?:\[[^\]]*\])?)+)")
STEP = re.compile(r"\.([A-Za-z_]\w*)")


def _walk_path(node: dict[str, Any], path: str) -> str | None:
    """None when every step of `.a[0].b` exists, else the first missing name."""
    for step in STEP.findall(re.sub(r"\[[^\]]*\]", "", path)):
        if step in node["blocks"]:
            node = node["blocks"][step]
            continue
        if step in node["arguments"] or step in node["attributes"]:
            return None  # a value: what follows indexes into it (a map key, ...)
        return str(step)
    return None


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key != "__is_block__":
                yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)
    elif isinstance(node, str):
        yield node


def _expressions(node: Any) -> Iterator[str]:
    for raw in _strings(node):
        yield from expression_parts(raw)


def reference_problems(
    declared: Declared, schema: dict[str, Any], everything: list[Any]
) -> list[str]:
    problems = set()
    kinds = {(kind, tf_type, name) for kind, tf_type, name in declared}
    for text in (part for node in everything for part in _expressions(node)):
        for data, tf_type, name, path in REFERENCE.findall(text):
            kind = "data" if data else "resource"
            if (kind, tf_type, name) not in kinds:
                continue  # an undeclared name is the structure tests' business
            for release, types in _releases(
                schema, tf_type, declared[(kind, tf_type, name)]
            ).items():
                missing = _walk_path(types[kind][tf_type], path)
                if missing:
                    problems.add(f"{data}{tf_type}.{name}{path}: no {missing!r} (@{release})")
    for (kind, tf_type, name), body in declared.items():
        for text in _expressions(body.get("lifecycle", [])):
            for path in SELF.findall(text):
                for release, types in _releases(schema, tf_type, body).items():
                    missing = _walk_path(types[kind][tf_type], path)
                    if missing:
                        problems.add(f"{tf_type}.{name}: self{path}: no {missing!r} (@{release})")
    return sorted(problems)


def _everything(directory: Path) -> list[Any]:
    nodes = []
    for path in sorted(directory.glob("*.tf")):
        with path.open(encoding="utf-8") as handle:
            nodes.append(_keep_blocks(hcl2.load(handle)))
    return nodes


# --------------------------------------------------------------------------- tests


def test_schema_names_its_sources(schema: dict[str, Any]) -> None:
    assert set(schema["providers"]) == {"google", "google-beta", "archive"}
    assert {
        "google@6.50.0",
        "google@8.7.0",
        "google-beta@6.50.0",
        "google-beta@8.7.0",
        "archive@2.8.1",
    } == set(schema["sources"])
    for source in schema["sources"].values():
        assert source.startswith("PyPI ")


def test_every_resource_and_block_matches_the_provider_schemas(
    declared: Declared, schema: dict[str, Any]
) -> None:
    assert declared
    assert config_problems(declared, schema) == []


def test_every_reference_names_a_real_attribute(declared: Declared, schema: dict[str, Any]) -> None:
    assert reference_problems(declared, schema, _everything(TERRAFORM_DIR)) == []


# The checks above must fail on a real mistake: each case below breaks a copy of the
# parsed module the way a typo would.


def _mutated(declared: Declared, key: tuple[str, str, str]) -> tuple[Declared, dict[str, Any]]:
    copied = copy.deepcopy(declared)
    return copied, copied[key]


HTTP = ("resource", "google_cloudfunctions2_function", "caption_http")


def test_a_misspelt_argument_is_caught(declared: Declared, schema: dict[str, Any]) -> None:
    copied, body = _mutated(declared, HTTP)
    service = body["service_config"][0]
    service["available_memroy"] = service.pop("available_memory")
    # Exactly this, once per google release: nothing else in the module is wrong.
    assert config_problems(copied, schema) == [
        f"google_cloudfunctions2_function.caption_http (@{release}).service_config: "
        "unknown argument 'available_memroy'"
        for release in ("6.50.0", "8.7.0")
    ]


def test_a_misspelt_block_is_caught(declared: Declared, schema: dict[str, Any]) -> None:
    copied, body = _mutated(declared, HTTP)
    body["build_confg"] = body.pop("build_config")
    problems = config_problems(copied, schema)
    assert any("unknown block 'build_confg'" in p for p in problems), problems


def test_a_misspelt_dynamic_block_is_caught(declared: Declared, schema: dict[str, Any]) -> None:
    copied, body = _mutated(declared, HTTP)
    (dynamic,) = body["service_config"][0]["dynamic"]
    dynamic["secret_env_variables"] = dynamic.pop("secret_environment_variables")
    problems = config_problems(copied, schema)
    assert any("unknown block 'secret_env_variables' (dynamic)" in p for p in problems)


def test_a_misspelt_argument_inside_a_dynamic_block_is_caught(
    declared: Declared, schema: dict[str, Any]
) -> None:
    copied, body = _mutated(declared, HTTP)
    (dynamic,) = body["service_config"][0]["dynamic"]
    (content,) = dynamic["secret_environment_variables"]["content"]
    content["projectid"] = content.pop("project_id")
    problems = config_problems(copied, schema)
    assert any("unknown argument 'projectid'" in p for p in problems), problems
    assert any("required argument 'project_id' missing" in p for p in problems), problems


def test_a_missing_required_argument_is_caught(declared: Declared, schema: dict[str, Any]) -> None:
    copied, body = _mutated(declared, ("resource", "google_service_account", "runtime"))
    del body["account_id"]
    problems = config_problems(copied, schema)
    assert any("required argument 'account_id' missing" in p for p in problems), problems


def test_a_block_written_twice_is_caught(declared: Declared, schema: dict[str, Any]) -> None:
    copied, body = _mutated(declared, HTTP)
    body["build_config"] = body["build_config"] * 2
    problems = config_problems(copied, schema)
    assert any("block 'build_config' may appear only once" in p for p in problems), problems


def test_a_computed_attribute_set_as_an_argument_is_caught(
    declared: Declared, schema: dict[str, Any]
) -> None:
    copied, body = _mutated(declared, ("resource", "google_service_account", "runtime"))
    body["email"] = '"x@example.com"'
    problems = config_problems(copied, schema)
    assert any("unknown argument 'email'" in p for p in problems), problems


def test_an_unknown_type_is_caught(declared: Declared, schema: dict[str, Any]) -> None:
    copied = copy.deepcopy(declared)
    copied[("resource", "google_cloudfunction2_function", "x")] = copied.pop(HTTP)
    problems = config_problems(copied, schema)
    assert any("google_cloudfunction2_function.x" in p and "not in" in p for p in problems)


def test_a_misspelt_reference_is_caught(declared: Declared, schema: dict[str, Any]) -> None:
    everything = [
        {"output": {"a": "${google_service_account.runtime.emial}"}},
        {"output": {"b": "${google_cloudfunctions2_function.caption_http.service_config[0].url}"}},
        {"output": {"c": "${data.archive_file.source.output_md6}"}},
        {"output": {"d": "${google_cloudfunctions2_function.caption_http.service_config[0].uri}"}},
    ]
    problems = reference_problems(declared, schema, everything)
    assert any("runtime.emial: no 'emial'" in p for p in problems), problems
    assert any("service_config[0].url: no 'url'" in p for p in problems), problems
    assert any("output_md6: no 'output_md6'" in p for p in problems), problems
    assert not any(".uri" in p for p in problems), problems


def test_a_misspelt_self_reference_is_caught(declared: Declared, schema: dict[str, Any]) -> None:
    copied, body = _mutated(declared, ("data", "google_storage_bucket", "allowed"))
    (postcondition,) = body["lifecycle"][0]["postcondition"]
    postcondition["condition"] = postcondition["condition"].replace(
        "self.project_number", "self.project_numbr"
    )
    problems = reference_problems(copied, schema, [])
    assert any("self.project_numbr: no 'project_numbr'" in p for p in problems), problems


SERVICE_IDENTITY = ("resource", "google_project_service_identity", "vertex_agent")


def test_beta_only_types_are_checked_against_google_beta(
    declared: Declared, schema: dict[str, Any]
) -> None:
    # google_project_service_identity exists only in google-beta: the block must say so,
    # and is then checked against both google-beta releases.
    body = declared[SERVICE_IDENTITY]
    assert provider_of(SERVICE_IDENTITY[1], body) == "google-beta"
    assert set(_releases(schema, SERVICE_IDENTITY[1], body)) == {"6.50.0", "8.7.0"}
    for release in ("6.50.0", "8.7.0"):
        assert SERVICE_IDENTITY[1] not in schema["providers"]["google"][release]["resource"]
    copied, body = _mutated(declared, SERVICE_IDENTITY)
    body["servce"] = body.pop("service")
    assert config_problems(copied, schema) == [
        f"google_project_service_identity.vertex_agent (@{release}): {problem}"
        for release in ("6.50.0", "8.7.0")
        for problem in ("unknown argument 'servce'", "required argument 'service' missing")
    ]


def test_a_beta_only_type_without_provider_google_beta_is_caught(
    declared: Declared, schema: dict[str, Any]
) -> None:
    copied, body = _mutated(declared, SERVICE_IDENTITY)
    del body["provider"]
    problems = config_problems(copied, schema)
    assert any(
        "google_project_service_identity.vertex_agent" in p and "not in provider_schema" in p
        for p in problems
    ), problems
