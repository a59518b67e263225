"""Offline checks of terraform/: structure, references and least privilege.

No provider can be downloaded here, so `terraform validate` cannot run. Instead the
configuration is parsed with python-hcl2 and its real structure is checked. Where
the terraform binary is on PATH, variable validations are also exercised for real:
variables.tf alone needs no provider, so `terraform plan` on a copy of it evaluates
every validation rule offline.

python-hcl2 8.x keeps the source form of values: a string literal is returned with
its quotes ('"python312"'), an expression as '${...}', block labels quoted, plus
'__is_block__' / '__comments__' bookkeeping keys. The helpers below normalise that.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hcl2
import pytest
from wcmatch import glob as wcglob

REPO_ROOT = Path(__file__).resolve().parents[2]
TERRAFORM_DIR = REPO_ROOT / "terraform"

PUBLIC_MEMBERS = ("allUsers", "allAuthenticatedUsers")
CAPTION_SETTINGS = {
    "CAPTION_MODEL",
    "CAPTION_PROMPT",
    "CAPTION_MAX_CONCURRENCY",
    "CAPTION_MAX_EDGE",
    "CAPTION_MAX_BYTES",
    "CAPTION_ALLOWED_BUCKETS",
    "CAPTION_LANGUAGES",
    "CAPTION_METADATA_PREFIX",
    "CAPTION_MODE",
    "CAPTION_RULES",
    "CAPTION_BATCH_PREFIX",
    "CAPTION_BUDGET_PREFIX",
    "CAPTION_DAILY_BUDGET_USD",
}
API_KEY_NAMES = {"GEMINI_API_KEY", "GOOGLE_API_KEY"}
VERTEX_SETTINGS = {"GOOGLE_GENAI_USE_VERTEXAI", "GOOGLE_CLOUD_PROJECT", "GOOGLE_CLOUD_LOCATION"}


# --------------------------------------------------------------------------- helpers


def _clean(node: Any) -> Any:
    """Drop hcl2 bookkeeping keys and unquote block labels, recursively."""
    if isinstance(node, dict):
        return {
            _unquote_label(key): _clean(value)
            for key, value in node.items()
            if not key.startswith("__")
        }
    if isinstance(node, list):
        return [_clean(item) for item in node]
    return node


def _unquote_label(key: str) -> str:
    return key[1:-1] if len(key) >= 2 and key[0] == key[-1] == '"' else key


def is_expression(raw: Any) -> bool:
    return isinstance(raw, str) and raw.startswith("${") and raw.endswith("}")


def literal(raw: Any) -> Any:
    """The value of a literal: strings unquoted, other scalars as they are.

    Raises for an expression, so a test never mistakes `var.x` for a fixed value.
    """
    if is_expression(raw):
        raise AssertionError(f"expected a literal, got the expression {raw}")
    if isinstance(raw, str) and len(raw) >= 2 and raw[0] == raw[-1] == '"':
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw[1:-1]
    return raw


def expression_parts(raw: str) -> Iterator[str]:
    """The expression text inside a value: the whole '${...}', or each interpolation."""
    if is_expression(raw):
        yield raw[2:-1]
        return
    start = raw.find("${")
    while start != -1:
        depth, index = 0, start + 1
        while index < len(raw):
            if raw[index] == "{":
                depth += 1
            elif raw[index] == "}":
                depth -= 1
                if depth == 0:
                    break
            index += 1
        yield raw[start + 2 : index]
        start = raw.find("${", index)


def walk_strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for value in node.values():
            yield from walk_strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk_strings(item)
    elif isinstance(node, str):
        yield node


def expressions_in(node: Any) -> list[str]:
    return [part for raw in walk_strings(node) for part in expression_parts(raw)]


def single_block(body: dict[str, Any], name: str) -> dict[str, Any]:
    blocks = body.get(name)
    assert isinstance(blocks, list), f"block {name!r} missing"
    assert len(blocks) == 1, f"expected one {name!r} block, found {len(blocks)}"
    block = blocks[0]
    assert isinstance(block, dict)
    return block


def dynamic_blocks(body: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """The `content` of every `dynamic "<name>"` block in body."""
    found = []
    for dynamic in body.get("dynamic", []):
        if name in dynamic:
            found.append(single_block(dynamic[name], "content"))
    return found


REFERENCE_PATTERNS = {
    "var": re.compile(r"(?<![\w.])var\.([A-Za-z_][\w-]*)"),
    "local": re.compile(r"(?<![\w.])local\.([A-Za-z_][\w-]*)"),
    "data": re.compile(r"(?<![\w.])data\.([A-Za-z_][\w-]*)\.([A-Za-z_][\w-]*)"),
    "module": re.compile(r"(?<![\w.])module\.([A-Za-z_][\w-]*)"),
    "resource": re.compile(r"(?<![\w.])((?:google|google_beta|archive)_\w+)\.([A-Za-z_][\w-]*)"),
}


@dataclass
class Config:
    variables: dict[str, dict[str, Any]] = field(default_factory=dict)
    locals: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    data: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    terraform: list[dict[str, Any]] = field(default_factory=list)
    providers: list[dict[str, Any]] = field(default_factory=list)

    def resource(self, rtype: str, name: str) -> dict[str, Any]:
        assert name in self.resources.get(rtype, {}), f"resource {rtype}.{name} missing"
        return self.resources[rtype][name]

    def iam_resources(self) -> Iterator[tuple[str, str, dict[str, Any]]]:
        for rtype, named in self.resources.items():
            if re.search(r"_iam_(member|binding|policy|audit_config)$", rtype):
                for name, body in named.items():
                    yield rtype, name, body

    def everything(self) -> list[Any]:
        return [
            self.variables,
            self.locals,
            self.resources,
            self.data,
            self.outputs,
            self.modules,
            self.terraform,
            self.providers,
        ]


def load_config(directory: Path) -> Config:
    config = Config()
    files = sorted(directory.glob("*.tf"))
    assert files, f"no .tf files in {directory}"
    for path in files:
        with path.open(encoding="utf-8") as handle:
            parsed = _clean(hcl2.load(handle))
        for entry in parsed.get("variable", []):
            for name, body in entry.items():
                assert name not in config.variables, f"variable {name} declared twice"
                config.variables[name] = body
        for entry in parsed.get("locals", []):
            for name, value in entry.items():
                assert name not in config.locals, f"local {name} declared twice"
                config.locals[name] = value
        for kind, target in (("resource", config.resources), ("data", config.data)):
            for entry in parsed.get(kind, []):
                for rtype, named in entry.items():
                    for name, body in named.items():
                        assert name not in target.get(rtype, {}), f"{rtype}.{name} twice"
                        target.setdefault(rtype, {})[name] = body
        for entry in parsed.get("output", []):
            config.outputs.update(entry)
        for entry in parsed.get("module", []):
            config.modules.update(entry)
        config.terraform.extend(parsed.get("terraform", []))
        config.providers.extend(parsed.get("provider", []))
    return config


def local_closure(config: Config, expression_text: str) -> str:
    """The expression plus, transitively, the definitions of the locals it uses."""
    seen: set[str] = set()
    texts = [expression_text]
    pending = REFERENCE_PATTERNS["local"].findall(expression_text)
    while pending:
        name = pending.pop()
        if name in seen or name not in config.locals:
            continue
        seen.add(name)
        for part in expressions_in(config.locals[name]):
            texts.append(part)
            pending.extend(REFERENCE_PATTERNS["local"].findall(part))
    return "\n".join(texts)


def map_keys(expression_text: str) -> set[str]:
    """Keys written in map literals of an expression (`{ KEY = value }`)."""
    return set(re.findall(r"(?:[{,]|^)\s*\"?([A-Z][A-Z0-9_]*)\"?\s*=(?!=)", expression_text, re.M))


def role_permissions(config: Config, role_raw: str) -> set[str] | None:
    """Permissions of a custom role referenced by expression, or None for a literal role."""
    if not is_expression(role_raw):
        return None
    match = re.fullmatch(
        r"google_project_iam_custom_role\.(\w+)(?:\[0\])?\.(id|name)", role_raw[2:-1]
    )
    assert match, f"role must be a literal or a module custom role, got {role_raw}"
    role = config.resource("google_project_iam_custom_role", match.group(1))
    return {literal(permission) for permission in role["permissions"]}


@pytest.fixture(scope="module")
def config() -> Config:
    return load_config(TERRAFORM_DIR)


# --------------------------------------------------------------------------- layout


def test_expected_files_exist() -> None:
    for name in (
        "versions.tf",
        "variables.tf",
        "main.tf",
        "iam.tf",
        "outputs.tf",
        "terraform.tfvars.example",
    ):
        assert (TERRAFORM_DIR / name).is_file(), name


def test_versions_pin_terraform_and_providers(config: Config) -> None:
    (block,) = config.terraform
    assert re.fullmatch(r">=\s*1\.5(\.0)?", literal(block["required_version"]))
    (required,) = block["required_providers"]
    assert literal(required["google"]["source"]) == "hashicorp/google"
    assert literal(required["archive"]["source"]) == "hashicorp/archive"
    for name, spec in required.items():
        assert "version" in spec, f"provider {name} has no version constraint"
        assert "<" in literal(spec["version"]), f"provider {name} has no upper bound"


def _lower_bound(constraint: str) -> tuple[int, ...]:
    (found,) = re.findall(r">=\s*(\d+(?:\.\d+)*)", constraint)
    return tuple(int(part) for part in found.split("."))


def test_archive_provider_is_one_with_glob_excludes(config: Config) -> None:
    # archive_file `excludes` are doublestar globs from 2.5.0 (CHANGELOG 2.5.0, #354);
    # 2.4.x compares each pattern to the path literally (see the literal-match test below).
    (block,) = config.terraform
    (required,) = block["required_providers"]
    assert _lower_bound(literal(required["archive"]["version"])) >= (2, 5, 0)


# --------------------------------------------------------------------------- variables


def test_every_variable_has_type_and_description(config: Config) -> None:
    assert config.variables
    for name, body in config.variables.items():
        assert "type" in body, f"variable {name} has no type"
        description = literal(body.get("description"))
        assert isinstance(description, str), f"variable {name} has no description"
        assert len(description.strip()) >= 10, f"variable {name}: description too short"


def test_constrained_variables_are_validated(config: Config) -> None:
    must_validate = {
        "project_id",
        "region",
        "name_prefix",
        "bucket_name",
        "allowed_buckets",
        "gemini_mode",
        "vertex_location",
        "http_invokers",
        "http_ingress",
        "min_instances",
        "max_instances",
        "max_instance_request_concurrency",
        "cpu",
        "memory",
        "event_timeout_seconds",
        "http_timeout_seconds",
        "caption_max_concurrency",
        "caption_max_edge",
        "caption_max_bytes",
        "caption_languages",
        "caption_metadata_prefix",
        "caption_batch_prefix",
    }
    for name in must_validate:
        assert name in config.variables, f"variable {name} missing"
        validations = config.variables[name].get("validation", [])
        assert validations, f"variable {name} has no validation"
        for validation in validations:
            condition = " ".join(expressions_in(validation["condition"]))
            assert f"var.{name}" in condition, f"{name}: validation ignores the variable"
            assert literal(validation["error_message"]).strip()


def test_every_declared_variable_is_used_and_every_used_one_declared(config: Config) -> None:
    used: set[str] = set()
    outside_variables = [part for node in config.everything()[1:] for part in expressions_in(node)]
    for part in outside_variables:
        used.update(REFERENCE_PATTERNS["var"].findall(part))
    declared = set(config.variables)
    assert used - declared == set(), "undeclared variables used"
    assert declared - used == set(), "declared variables never used"


def test_timeout_and_ingress_limits_are_in_the_validations(config: Config) -> None:
    event_timeout = " ".join(expressions_in(config.variables["event_timeout_seconds"]))
    assert "<= 540" in event_timeout
    assert literal(config.variables["event_timeout_seconds"]["default"]) == 540
    http_timeout = " ".join(expressions_in(config.variables["http_timeout_seconds"]))
    assert "<= 3600" in http_timeout
    ingress = " ".join(expressions_in(config.variables["http_ingress"]["validation"]))
    for value in ("ALLOW_ALL", "ALLOW_INTERNAL_ONLY", "ALLOW_INTERNAL_AND_GCLB"):
        assert f'"{value}"' in ingress


def test_http_invokers_validation_names_the_public_members(config: Config) -> None:
    conditions = [
        " ".join(expressions_in(validation["condition"]))
        for validation in config.variables["http_invokers"]["validation"]
    ]
    assert any(
        all(f'"{member}"' in condition for member in PUBLIC_MEMBERS) and "!contains(" in condition
        for condition in conditions
    ), "no validation of http_invokers rejects allUsers and allAuthenticatedUsers"


def test_no_secret_has_a_default_and_no_variable_carries_a_key(config: Config) -> None:
    for name, body in config.variables.items():
        assert name not in {"gemini_api_key", "api_key", "google_api_key"}, name
        if "sensitive" in body:
            assert body.get("default") is None, f"sensitive variable {name} has a default"


# --------------------------------------------------------------------------- references


def _declared_references(config: Config) -> dict[str, set[Any]]:
    return {
        "local": set(config.locals),
        "data": {(rtype, name) for rtype, named in config.data.items() for name in named},
        "module": set(config.modules),
        "resource": {(rtype, name) for rtype, named in config.resources.items() for name in named},
    }


def test_every_reference_resolves(config: Config) -> None:
    declared = _declared_references(config)
    missing: set[str] = set()
    for part in (part for node in config.everything() for part in expressions_in(node)):
        for name in REFERENCE_PATTERNS["local"].findall(part):
            if name not in declared["local"]:
                missing.add(f"local.{name}")
        for found in REFERENCE_PATTERNS["data"].findall(part):
            if found not in declared["data"]:
                missing.add("data.{}.{}".format(*found))
        for name in REFERENCE_PATTERNS["module"].findall(part):
            if name not in declared["module"]:
                missing.add(f"module.{name}")
        for found in REFERENCE_PATTERNS["resource"].findall(part):
            if found not in declared["resource"]:
                missing.add("{}.{}".format(*found))
    assert missing == set()


def test_every_local_is_used(config: Config) -> None:
    used: set[str] = set()
    for part in (part for node in config.everything() for part in expressions_in(node)):
        used.update(REFERENCE_PATTERNS["local"].findall(part))
    assert set(config.locals) - used == set()


def test_reference_patterns_see_what_they_should() -> None:
    # Guards the regular expressions the reference tests rely on.
    text = (
        "var.a ? google_storage_bucket.b[0].name : data.google_project.c.number"
        " + local.d + module.e.x + each.value.f + path.module + g.h"
    )
    assert REFERENCE_PATTERNS["var"].findall(text) == ["a"]
    assert REFERENCE_PATTERNS["resource"].findall(text) == [("google_storage_bucket", "b")]
    assert REFERENCE_PATTERNS["data"].findall(text) == [("google_project", "c")]
    assert REFERENCE_PATTERNS["local"].findall(text) == ["d"]
    assert REFERENCE_PATTERNS["module"].findall(text) == ["e"]


def test_outputs_are_few_and_described(config: Config) -> None:
    assert 1 <= len(config.outputs) <= 6
    for name, body in config.outputs.items():
        description = literal(body.get("description"))
        assert isinstance(description, str), f"output {name} has no description"
        assert description.strip(), f"output {name} has an empty description"
    for name in (
        "http_function_url",
        "watched_bucket_name",
        "runtime_service_account_email",
        "event_function_name",
    ):
        assert name in config.outputs, name


# --------------------------------------------------------------------------- APIs


def test_required_apis_are_enabled_and_never_disabled(config: Config) -> None:
    services = config.resources["google_project_service"]
    texts = [literal(body.get("disable_on_destroy")) for body in services.values()]
    assert texts
    assert all(value is False for value in texts)
    enabled = " ".join(
        local_closure(config, part) for body in services.values() for part in expressions_in(body)
    )
    for api in (
        "cloudfunctions",
        "run",
        "cloudbuild",
        "artifactregistry",
        "eventarc",
        "pubsub",
        "storage",
        "iam",
        "aiplatform",
        "secretmanager",
    ):
        assert f'"{api}.googleapis.com"' in enabled, api


# --------------------------------------------------------------------------- functions


def _functions(config: Config) -> dict[str, dict[str, Any]]:
    return config.resources["google_cloudfunctions2_function"]


def test_both_functions_are_gen2_python312_with_their_entry_points(config: Config) -> None:
    functions = _functions(config)
    assert set(functions) == {"caption_on_upload", "caption_http"}
    for name, body in functions.items():
        build = single_block(body, "build_config")
        assert literal(build["runtime"]) == "python312"
        assert literal(build["entry_point"]) == name
        storage_source = single_block(single_block(build, "source"), "storage_source")
        assert is_expression(storage_source["object"])
        assert "google_storage_bucket_object.source" in storage_source["object"]


def test_source_object_name_changes_with_the_code(config: Config) -> None:
    obj = config.resource("google_storage_bucket_object", "source")
    name_expressions = " ".join(expression_parts(obj["name"]))
    assert re.search(
        r"data\.archive_file\.source\.output_(md5|sha\w*|base64sha\w*)", name_expressions
    )
    assert "data.archive_file.source.output_path" in obj["source"]


def test_both_functions_run_as_the_module_runtime_account(config: Config) -> None:
    for body in _functions(config).values():
        service = single_block(body, "service_config")
        assert service["service_account_email"] == "${google_service_account.runtime.email}"
    assert "runtime" in config.resources["google_service_account"]


def test_event_function_trigger(config: Config) -> None:
    body = _functions(config)["caption_on_upload"]
    trigger = single_block(body, "event_trigger")
    assert literal(trigger["event_type"]) == "google.cloud.storage.object.v1.finalized"
    assert literal(trigger["retry_policy"]) == "RETRY_POLICY_RETRY"
    filters = trigger["event_filters"]
    assert [literal(item["attribute"]) for item in filters] == ["bucket"]
    assert "operator" not in filters[0]
    watched = local_closure(config, " ".join(expression_parts(filters[0]["value"])))
    assert "google_storage_bucket.watched" in watched
    assert "data.google_storage_bucket.existing" in watched
    # Its own identity, not the runtime one.
    assert trigger["service_account_email"] == "${google_service_account.trigger.email}"
    assert literal(single_block(body, "service_config")["ingress_settings"]) == (
        "ALLOW_INTERNAL_ONLY"
    )


def test_http_function_has_no_trigger_and_configurable_ingress(config: Config) -> None:
    body = _functions(config)["caption_http"]
    assert "event_trigger" not in body
    assert single_block(body, "service_config")["ingress_settings"] == "${var.http_ingress}"


def test_concurrency_above_one_requires_a_whole_cpu(config: Config) -> None:
    for name, body in _functions(config).items():
        conditions = [
            " ".join(expressions_in(pre["condition"]))
            for pre in single_block(body, "lifecycle")["precondition"]
        ]
        assert any(
            "var.max_instance_request_concurrency" in c and "var.cpu" in c for c in conditions
        ), name
        service = single_block(body, "service_config")
        assert service["available_cpu"] == "${var.cpu}"
        assert service["max_instance_request_concurrency"] == (
            "${var.max_instance_request_concurrency}"
        )


HTTP_ONLY_SETTINGS = {"CAPTION_HTTP_DEADLINE"}


def test_environment_carries_the_caption_settings_and_never_the_key(config: Config) -> None:
    for name, body in _functions(config).items():
        service = single_block(body, "service_config")
        raw = service["environment_variables"]
        if isinstance(raw, dict):
            keys, text = set(raw), json.dumps(raw)
        else:
            text = local_closure(config, " ".join(expression_parts(raw)))
            keys = map_keys(text)
        assert keys & API_KEY_NAMES == set(), name
        assert "google_secret_manager" not in text, name
        caption_keys = {key for key in keys if key.startswith("CAPTION_")}
        expected = CAPTION_SETTINGS | (HTTP_ONLY_SETTINGS if name == "caption_http" else set())
        assert caption_keys == expected, name
        assert keys >= VERTEX_SETTINGS, name
        # CAPTION_PROMPT is optional: only set when the variable is.
        assert re.search(r"var\.caption_prompt\s*==\s*null\s*\?\s*\{\}", text), name


def test_api_key_arrives_only_as_a_secret_environment_variable(config: Config) -> None:
    for name, body in _functions(config).items():
        service = single_block(body, "service_config")
        secrets = list(service.get("secret_environment_variables", []))
        secrets += dynamic_blocks(service, "secret_environment_variables")
        assert [literal(secret["key"]) for secret in secrets] == ["GEMINI_API_KEY"], name
    # The key's value never passes through Terraform: no version resource, no data source.
    assert "google_secret_manager_secret_version" not in config.resources
    assert "google_secret_manager_secret_version" not in config.data
    assert "google_secret_manager_secret" in config.resources


def test_api_key_names_appear_nowhere_but_in_secret_mounts(config: Config) -> None:
    def strip_secret_mounts(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                key: strip_secret_mounts(value)
                for key, value in node.items()
                if key != "secret_environment_variables"
            }
        if isinstance(node, list):
            return [strip_secret_mounts(item) for item in node]
        return node

    rest = strip_secret_mounts(
        [config.locals, config.resources, config.data, config.outputs, config.modules]
    )
    for raw in walk_strings(rest):
        for name in API_KEY_NAMES:
            assert name not in raw, f"{name} appears outside a secret mount: {raw}"


# --------------------------------------------------------------------------- IAM


def test_no_public_member_anywhere(config: Config) -> None:
    # The only place the public principals may be written is the validation that rejects them.
    without_validations = {
        name: {key: value for key, value in body.items() if key != "validation"}
        for name, body in config.variables.items()
    }
    nodes = [without_validations, *config.everything()[1:]]
    for raw in walk_strings(nodes):
        for member in PUBLIC_MEMBERS:
            assert member not in raw, f"{member} in {raw}"
    for rtype, name, body in config.iam_resources():
        members = body.get("members", []) + ([body["member"]] if "member" in body else [])
        assert members, f"{rtype}.{name} grants to nobody"
        for member in members:
            if not is_expression(member):
                assert literal(member) not in PUBLIC_MEMBERS, f"{rtype}.{name}"


def test_no_authoritative_iam(config: Config) -> None:
    authoritative = [
        rtype
        for rtype in config.resources
        if re.search(r"_iam_(binding|policy|audit_config)$", rtype)
    ]
    assert authoritative == []
    assert "google_iam_policy" not in config.data


def test_no_broad_project_roles(config: Config) -> None:
    forbidden = {"roles/owner", "roles/editor", "roles/viewer", "roles/iam.securityAdmin"}
    for rtype in ("google_project_iam_member", "google_project_iam_binding"):
        for name, body in config.resources.get(rtype, {}).items():
            role = body["role"]
            permissions = role_permissions(config, role)
            if permissions is None:
                role_name = literal(role)
                assert role_name not in forbidden, f"{rtype}.{name}: {role_name}"
                assert not role_name.startswith("roles/storage."), f"{rtype}.{name}"
                assert not role_name.endswith(".admin"), f"{rtype}.{name}"
            else:
                assert not any(p.startswith("storage.") for p in permissions), name


def test_storage_access_is_granted_on_buckets_only(config: Config) -> None:
    storage_grants = []
    for rtype, name, body in config.iam_resources():
        permissions = role_permissions(config, body["role"])
        touches_storage = (
            any(p.startswith("storage.") for p in permissions)
            if permissions is not None
            else literal(body["role"]).startswith("roles/storage.")
        )
        if touches_storage:
            assert rtype == "google_storage_bucket_iam_member", f"{rtype}.{name}"
            storage_grants.append(body)
    assert storage_grants, "the runtime gets no object access at all"


def test_object_role_is_minimal_and_covers_every_allowed_bucket(config: Config) -> None:
    role = config.resource("google_project_iam_custom_role", "object_captioner")
    assert {literal(p) for p in role["permissions"]} == {
        "storage.objects.get",
        "storage.objects.list",
        "storage.objects.update",
    }
    grant = config.resource("google_storage_bucket_iam_member", "runtime_objects")
    assert grant["member"] == "${google_service_account.runtime.member}"
    assert role_permissions(config, grant["role"]) is not None
    buckets = local_closure(config, " ".join(expression_parts(grant["for_each"])))
    assert "var.bucket_name" in buckets
    assert "var.allowed_buckets" in buckets
    assert grant["bucket"] == "${each.value}"


VERTEX_PERMISSIONS = {
    # Vertex AI generative AI access control, "Make prompt requests" (generateContent).
    "aiplatform.endpoints.predict",
    # Vertex AI IAM permissions: create a batch prediction job, follow it, cancel it.
    "aiplatform.batchPredictionJobs.cancel",
    "aiplatform.batchPredictionJobs.create",
    "aiplatform.batchPredictionJobs.get",
    "aiplatform.batchPredictionJobs.list",
}


def test_gemini_access_is_narrow(config: Config) -> None:
    vertex = config.resource("google_project_iam_member", "runtime_vertex")
    assert "local.use_vertex" in vertex["count"] or "var.gemini_mode" in vertex["count"]
    assert vertex["member"] == "${google_service_account.runtime.member}"
    # A custom role with exactly what calling Gemini takes, not roles/aiplatform.user.
    assert role_permissions(config, vertex["role"]) == VERTEX_PERMISSIONS
    role = config.resource("google_project_iam_custom_role", "vertex_caller")
    assert role["count"] == vertex["count"]
    for raw in walk_strings(config.everything()):
        assert "roles/aiplatform" not in raw, f"a predefined Vertex AI role is granted: {raw}"
    (accessor,) = config.resources["google_secret_manager_secret_iam_member"].values()
    assert literal(accessor["role"]) == "roles/secretmanager.secretAccessor"
    assert "google_secret_manager_secret.gemini_api_key" in accessor["secret_id"]
    assert accessor["member"] == "${google_service_account.runtime.member}"


# The Vertex AI service agent: batch prediction jobs run as it, reading the requests and
# the images from the watched bucket and writing their answers under CAPTION_BATCH_PREFIX.
VERTEX_AGENT_MEMBER = (
    "serviceAccount:service-${data.google_project.this.number}"
    "@gcp-sa-aiplatform.iam.gserviceaccount.com"
)
VERTEX_MODE_COUNT = "${local.use_vertex ? 1 : 0}"


def _vertex_agent_grants(config: Config) -> dict[tuple[str, str], dict[str, Any]]:
    """Every IAM resource granting something to the Vertex AI service agent."""
    grants = {}
    for rtype, name, body in config.iam_resources():
        members = body.get("members", []) + ([body["member"]] if "member" in body else [])
        # A member written through locals counts with the locals' own text.
        text = " ".join(members)
        for local_name in REFERENCE_PATTERNS["local"].findall(text):
            text += " " + json.dumps(config.locals.get(local_name))
        if "gcp-sa-aiplatform" in text:
            grants[(rtype, name)] = body
    return grants


def test_vertex_agent_email_uses_the_project_number(config: Config) -> None:
    assert literal(config.locals["vertex_agent_member"]) == VERTEX_AGENT_MEMBER
    assert "gcp-sa-aiplatform.googleapis.com" not in json.dumps(config.everything())
    # The grants name the agent through that local, never through a project id.
    for body in _vertex_agent_grants(config).values():
        assert body["member"] == "${local.vertex_agent_member}"


def test_vertex_agent_is_created_before_it_is_granted(config: Config) -> None:
    # Google creates service agents "after you activate and use the API"; one that does
    # not exist yet cannot be granted (https://cloud.google.com/iam/docs/create-service-agents).
    identity = config.resource("google_project_service_identity", "vertex_agent")
    assert identity["count"] == VERTEX_MODE_COUNT
    assert identity["provider"] == "google-beta"
    assert literal(identity["service"]) == "aiplatform.googleapis.com"
    assert identity["project"] == "${var.project_id}"
    assert "${google_project_service.enabled}" in identity["depends_on"]
    services = local_closure(config, " ".join(expressions_in(config.locals["services"])))
    assert re.search(r'local\.use_vertex \? \["aiplatform\.googleapis\.com"\]', services)
    (block,) = config.terraform
    (required,) = block["required_providers"]
    assert literal(required["google-beta"]["source"]) == "hashicorp/google-beta"
    assert literal(required["google-beta"]["version"]) == literal(required["google"]["version"])
    assert "google-beta" in {name for provider in config.providers for name in provider}
    for body in _vertex_agent_grants(config).values():
        assert "${google_project_service_identity.vertex_agent}" in body["depends_on"]


def test_vertex_agent_grants_exist_only_in_vertex_mode(config: Config) -> None:
    grants = _vertex_agent_grants(config)
    assert set(grants) == {
        ("google_storage_bucket_iam_member", "vertex_agent_read"),
        ("google_storage_bucket_iam_member", "vertex_agent_write_batch"),
    }
    for body in grants.values():
        assert body["count"] == VERTEX_MODE_COUNT
    assert config.locals["use_vertex"] == '${var.gemini_mode == "vertex"}'


def test_vertex_agent_gets_nothing_project_wide(config: Config) -> None:
    for rtype, name in _vertex_agent_grants(config):
        assert rtype == "google_storage_bucket_iam_member", f"{rtype}.{name}"
    for rtype, named in config.resources.items():
        if rtype.startswith(("google_project_iam", "google_folder_iam", "google_organization_iam")):
            for name, body in named.items():
                assert "vertex_agent" not in json.dumps(body), f"{rtype}.{name}"
                assert "gcp-sa-aiplatform" not in json.dumps(body), f"{rtype}.{name}"


def test_vertex_agent_reads_the_watched_bucket(config: Config) -> None:
    read = config.resource("google_storage_bucket_iam_member", "vertex_agent_read")
    assert read["bucket"] == "${local.watched_bucket}"
    assert literal(read["role"]) == "roles/storage.objectViewer"
    assert "condition" not in read  # the images may be anywhere in the bucket


def test_vertex_agent_writes_only_under_the_batch_prefix(config: Config) -> None:
    write = config.resource("google_storage_bucket_iam_member", "vertex_agent_write_batch")
    assert write["bucket"] == "${local.watched_bucket}"
    # Create only: jobs write new files; no overwrite or delete (objectUser, objectAdmin).
    assert literal(write["role"]) == "roles/storage.objectCreator"
    (condition,) = write["condition"]
    # Cloud Storage objects are projects/_/buckets/BUCKET/objects/OBJECT in IAM Conditions
    # (https://cloud.google.com/iam/docs/conditions-resource-attributes#resource-name).
    assert literal(condition["expression"]) == (
        'resource.name.startsWith("projects/_/buckets/${local.watched_bucket}'
        '/objects/${var.caption_batch_prefix}")'
    )
    assert literal(condition["title"]).strip()
    # Every other storage grant the agent has is read-only.
    for (_rtype, name), body in _vertex_agent_grants(config).items():
        if name != "vertex_agent_write_batch":
            assert literal(body["role"]) == "roles/storage.objectViewer", name


def test_the_function_writes_and_deletes_only_its_batch_files_under_the_batch_prefix(
    config: Config,
) -> None:
    grant = config.resource("google_storage_bucket_iam_member", "runtime_batch_files")
    assert "local.use_vertex" in grant["for_each"]
    assert "local.runtime_buckets" in grant["for_each"]
    assert grant["member"] == "${google_service_account.runtime.member}"
    assert role_permissions(config, grant["role"]) == {
        "storage.objects.create",
        "storage.objects.delete",
    }
    (condition,) = grant["condition"]
    assert literal(condition["expression"]) == (
        'resource.name.startsWith("projects/_/buckets/${each.value}'
        '/objects/${var.caption_batch_prefix}")'
    )
    # Outside the prefix, the images: read, list and metadata updates only.
    objects = config.resource("google_storage_bucket_iam_member", "runtime_objects")
    assert "storage.objects.delete" not in (role_permissions(config, objects["role"]) or set())
    assert "storage.objects.create" not in (role_permissions(config, objects["role"]) or set())


def test_batch_prefix_default_is_the_applications(config: Config) -> None:
    settings = (TERRAFORM_DIR.parent / "src" / "captioner" / "settings.py").read_text()
    (default,) = re.findall(r'^\s*batch_prefix: str = "([^"]*)"', settings, re.M)
    assert literal(config.variables["caption_batch_prefix"]["default"]) == default
    for name, body in _functions(config).items():
        raw = single_block(body, "service_config")["environment_variables"]
        text = local_closure(config, " ".join(expression_parts(raw)))
        assert re.search(r"CAPTION_BATCH_PREFIX\s*=\s*var\.caption_batch_prefix", text), name


def test_event_delivery_grants(config: Config) -> None:
    project_roles = {
        (literal(body["role"]), body["member"])
        for body in config.resources["google_project_iam_member"].values()
        if not is_expression(body["role"])
    }
    assert ("roles/eventarc.eventReceiver", "${google_service_account.trigger.member}") in (
        project_roles
    )
    assert any(
        role == "roles/pubsub.publisher" and "data.google_storage_project_service_account" in member
        for role, member in project_roles
    )
    invokers = [
        body
        for body in config.resources["google_cloud_run_v2_service_iam_member"].values()
        if "google_cloudfunctions2_function.caption_on_upload" in body["name"]
    ]
    assert len(invokers) == 1
    assert literal(invokers[0]["role"]) == "roles/run.invoker"
    assert invokers[0]["member"] == "${google_service_account.trigger.member}"


def test_http_callers_are_exactly_http_invokers(config: Config) -> None:
    grants = [
        body
        for body in config.resources["google_cloud_run_v2_service_iam_member"].values()
        if "google_cloudfunctions2_function.caption_http" in body["name"]
    ]
    assert len(grants) == 1
    assert "var.http_invokers" in grants[0]["for_each"]
    assert grants[0]["member"] == "${each.value}"
    assert literal(grants[0]["role"]) == "roles/run.invoker"


def test_created_bucket_is_locked_down(config: Config) -> None:
    for name, body in config.resources["google_storage_bucket"].items():
        assert literal(body["uniform_bucket_level_access"]) is True, name
        assert literal(body["public_access_prevention"]) == "enforced", name
    watched = config.resource("google_storage_bucket", "watched")
    assert single_block(watched, "versioning")["enabled"] == "${var.bucket_versioning}"
    assert watched["force_destroy"] == "${var.bucket_force_destroy}"


# --------------------------------------------------------------------------- source archive


# The archive provider (>= 2.5.0) matches each exclude with doublestar's PathMatch
# against the path relative to source_dir, walks with filepath.Walk, and skips a
# matching directory whole. wcmatch with these flags has the same rules: `*` and `?`
# stop at "/", `**` as a whole component spans any number of directories (none too),
# leading dots are ordinary characters, and {a,b} alternates.
DOUBLESTAR = wcglob.GLOBSTAR | wcglob.DOTGLOB | wcglob.BRACE | wcglob.FORCEUNIX


def _doublestar(pattern: str) -> Callable[[str], bool]:
    return lambda path: wcglob.globmatch(path, pattern, flags=DOUBLESTAR)


def _literal(pattern: str) -> Callable[[str], bool]:
    """How archive 2.4.x matched an exclude: the whole relative path, equal or not."""
    return lambda path: path == pattern


Matcher = Callable[[str], bool]


def _archive(config: Config) -> dict[str, Any]:
    return config.data["archive_file"]["source"]


def _excludes(config: Config) -> list[str]:
    return [literal(raw) for raw in _archive(config)["excludes"]]


def _excluded(patterns: list[Matcher], relative: str) -> bool:
    return any(pattern(relative) for pattern in patterns)


def _excluded_path(patterns: list[Matcher], relative: str) -> bool:
    """Whether the walk drops this file, itself or through one of its directories."""
    parts = relative.split("/")
    return any(_excluded(patterns, "/".join(parts[: depth + 1])) for depth in range(len(parts)))


def _archived_files(root: Path, patterns: list[Matcher]) -> list[str]:
    """Mimic the provider's walk: a matching directory is skipped with its contents."""
    kept: list[str] = []
    for current, dirs, files in os.walk(root):
        relative_dir = Path(current).relative_to(root).as_posix()
        prefix = "" if relative_dir == "." else relative_dir + "/"
        dirs[:] = [d for d in dirs if not _excluded(patterns, prefix + d)]
        kept.extend(prefix + f for f in files if not _excluded(patterns, prefix + f))
    return sorted(kept)


def test_doublestar_matching() -> None:
    assert _doublestar("**/__pycache__")("__pycache__")
    assert _doublestar("**/__pycache__")("src/captioner/__pycache__")
    assert _doublestar(".venv*")(".venv-checkov")
    assert _doublestar(".env.*")(".env.local")
    assert not _doublestar(".venv*")("src/.venv")
    assert not _doublestar("tests")("src/tests")
    assert not _doublestar("*.pyc")("src/a.pyc")
    assert _doublestar("**/*.pyc")("a.pyc")
    assert not _doublestar("src/captioner_dev")("src/captioner")


# A checkout as a developer has it: secrets, virtualenvs, caches and build output
# beside the three things the function needs.
CHECKOUT = {
    "main.py": "",
    "requirements.txt": "",
    "src/captioner/__init__.py": "",
    "src/captioner/pipeline.py": "",
    "src/captioner/sub/module.py": "",
    ".env": "GEMINI_API_KEY=secret",
    ".env.local": "GEMINI_API_KEY=secret",
    ".venv/bin/python": "",
    ".venv/lib/python3.12/site-packages/x.py": "",
    ".venv-checkov/bin/checkov": "",
    "__pycache__/main.cpython-312.pyc": "",
    "src/captioner/__pycache__/pipeline.cpython-312.pyc": "",
    "src/captioner/stray.pyc": "",
    "build/lib/captioner/__init__.py": "",
    "dist/captioner-1.0.tar.gz": "",
    "src/captioner_dev/fake_gemini.py": "",
    "src/captioner.egg-info/PKG-INFO": "",
    "tests/unit/test_pipeline.py": "",
    "terraform/main.tf": "",
    "terraform/.terraform/captioner-source.zip": "",
    "bench/run.py": "",
    "docs/deploy.md": "",
    ".git/HEAD": "",
    ".pytest_cache/v/cache/nodeids": "",
    ".mypy_cache/3.12/main.meta.json": "",
    ".ruff_cache/CACHEDIR.TAG": "",
    "README.md": "",
    "pyproject.toml": "",
    "Makefile": "",
    "requirements-dev.txt": "",
}
FUNCTION_FILES = [
    "main.py",
    "requirements.txt",
    "src/captioner/__init__.py",
    "src/captioner/pipeline.py",
    "src/captioner/sub/module.py",
]


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    for relative, content in CHECKOUT.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
    return tmp_path


def test_archive_keeps_exactly_the_function_with_glob_excludes(
    config: Config, checkout: Path
) -> None:
    patterns = [_doublestar(pattern) for pattern in _excludes(config)]
    assert _archived_files(checkout, patterns) == FUNCTION_FILES


def test_literal_excludes_of_archive_2_4_would_deploy_secrets(
    config: Config, checkout: Path
) -> None:
    # Why versions.tf asks for archive >= 2.5.0: with 2.4's literal matching the same
    # excludes let a .env.local, the virtualenvs and the caches into the archive.
    patterns = [_literal(pattern) for pattern in _excludes(config)]
    leaked = set(_archived_files(checkout, patterns)) - set(FUNCTION_FILES)
    assert {".env.local", ".venv-checkov/bin/checkov"} <= leaked
    assert any(path.endswith(".pyc") for path in leaked)


def test_archive_is_the_repository_root(config: Config) -> None:
    archive = _archive(config)
    assert literal(archive["type"]) == "zip"
    assert literal(archive["source_dir"]) == "${path.module}/.."


def test_archive_excludes_everything_but_the_function(config: Config) -> None:
    patterns = [_doublestar(pattern) for pattern in _excludes(config)]
    for path in (
        "tests/unit/test_pipeline.py",
        "tests/terraform/run_checkov.sh",
        "terraform/main.tf",
        "terraform/.terraform/captioner-source.zip",
        "bench/run.py",
        "docs/deploy.md",
        ".git/HEAD",
        ".venv/bin/python",
        ".venv-checkov/bin/checkov",
        ".ci/run",
        "src/captioner_dev/fake_gemini.py",
        "src/captioner/__pycache__/pipeline.cpython-312.pyc",
        "__pycache__/main.cpython-312.pyc",
        ".pytest_cache/v/cache/nodeids",
        ".mypy_cache/3.11/main.meta.json",
        ".ruff_cache/CACHEDIR.TAG",
        ".hypothesis/examples/x",
        "Makefile",
        "requirements-dev.txt",
        "requirements-stack.txt",
    ):
        assert _excluded_path(patterns, path), f"{path} would be deployed"
    for path in (
        "main.py",
        "requirements.txt",
        "src/captioner/__init__.py",
        "src/captioner/pipeline.py",
    ):
        assert not _excluded_path(patterns, path), f"{path} would be left out"


def test_archive_of_this_checkout_holds_only_the_function(config: Config) -> None:
    patterns = [_doublestar(pattern) for pattern in _excludes(config)]
    files = _archived_files(REPO_ROOT, patterns)
    tolerated = re.compile(
        r"main\.py|requirements\.txt|src/captioner/.+|LICENSE.*|\.python-version"
    )
    unexpected = [path for path in files if not tolerated.fullmatch(path)]
    assert unexpected == [], (
        "these files would be deployed with the functions; exclude them in "
        "data.archive_file.source (terraform/main.tf) or extend this list"
    )


# --------------------------------------------------------------------------- terraform binary

TERRAFORM = shutil.which("terraform")
needs_terraform = pytest.mark.skipif(TERRAFORM is None, reason="terraform binary not on PATH")
REQUIRED_VARS = {"project_id": "my-project-123", "bucket_name": "my-photos-1"}


def _terraform(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    assert TERRAFORM is not None
    env = {
        **os.environ,
        "CHECKPOINT_DISABLE": "1",
        "TF_IN_AUTOMATION": "1",
        "TF_INPUT": "0",
        "TF_CLI_CONFIG_FILE": os.devnull,
    }
    return subprocess.run(
        [TERRAFORM, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def variables_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root module holding only variables.tf: it needs no provider, so it plans offline."""
    directory = tmp_path_factory.mktemp("tf-variables")
    shutil.copy(TERRAFORM_DIR / "variables.tf", directory / "variables.tf")
    result = _terraform(["init", "-no-color", "-backend=false"], directory)
    assert result.returncode == 0, result.stderr
    return directory


def _plan(directory: Path, **overrides: str) -> subprocess.CompletedProcess[str]:
    values = {**REQUIRED_VARS, **overrides}
    args = ["plan", "-no-color", "-lock=false", "-refresh=false"]
    for name, value in values.items():
        args += ["-var", f"{name}={value}"]
    return _terraform(args, directory)


@needs_terraform
def test_terraform_fmt_is_clean() -> None:
    result = _terraform(["fmt", "-check", "-no-color", "."], TERRAFORM_DIR)
    assert result.returncode == 0, f"not formatted: {result.stdout}{result.stderr}"


@needs_terraform
def test_defaults_pass_their_own_validations(variables_only: Path) -> None:
    result = _plan(variables_only)
    assert result.returncode == 0, result.stderr


@needs_terraform
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("http_invokers", '["allUsers"]'),
        ("http_invokers", '["user:a@example.com", "allAuthenticatedUsers"]'),
        ("http_invokers", '["a@example.com"]'),
        ("http_ingress", "ALLOW_SOME"),
        ("gemini_mode", "openai"),
        ("event_timeout_seconds", "541"),
        ("http_timeout_seconds", "3601"),
        ("cpu", "3"),
        ("cpu", "fast"),
        ("memory", "1GB"),
        ("name_prefix", "Captioner"),
        ("bucket_name", "gs://photos"),
        ("allowed_buckets", '["gs://other"]'),
        ("caption_prompt", "   "),
        ("caption_languages", "[]"),
        ("caption_languages", '["en", "en"]'),
        ("caption_metadata_prefix", "c" * 33),
        ("caption_prompt", "x" * 4001),
        ("min_instances", "-1"),
        ("max_instance_request_concurrency", "0"),
        ("gemini_api_key_secret_version", "0"),
        ("labels", '{"Team" = "x"}'),
        ("caption_batch_prefix", "captioner-batch"),
        ("caption_batch_prefix", "/captioner-batch/"),
        ("caption_batch_prefix", 'a"b/'),
        ("caption_batch_prefix", "a\\b/"),
        ("caption_batch_prefix", "b" * 200 + "/"),
    ],
)
def test_validations_reject_bad_values(variables_only: Path, name: str, value: str) -> None:
    result = _plan(variables_only, **{name: value})
    assert result.returncode != 0, f"{name}={value} was accepted"
    assert "Invalid value for variable" in result.stderr, result.stderr


@needs_terraform
def test_public_invokers_are_rejected_with_the_reason(variables_only: Path) -> None:
    for member in PUBLIC_MEMBERS:
        result = _plan(variables_only, http_invokers=f'["{member}"]')
        assert result.returncode != 0
        assert "never public" in " ".join(result.stderr.split())


@needs_terraform
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("http_invokers", '["user:a@example.com", "serviceAccount:b@p.iam.gserviceaccount.com"]'),
        ("http_timeout_seconds", "3600"),
        ("cpu", "0.5"),
        ("caption_prompt", "Describe the photo."),
        ("gemini_mode", "api_key"),
        ("build_service_account", "projects/p/serviceAccounts/b@p.iam.gserviceaccount.com"),
        ("caption_languages", '["en", "pt-BR"]'),
        ("caption_batch_prefix", "backfills/2026 run/"),
        ("caption_batch_prefix", "b" * 199 + "/"),
    ],
)
def test_validations_accept_good_values(variables_only: Path, name: str, value: str) -> None:
    result = _plan(variables_only, **{name: value})
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- apply-time failures


def _preconditions(body: dict[str, Any]) -> list[dict[str, Any]]:
    return list(single_block(body, "lifecycle").get("precondition", []))


def _cpu_memory_precondition(body: dict[str, Any]) -> dict[str, Any]:
    (found,) = [pre for pre in _preconditions(body) if "local.cpu_memory_ok" in pre["condition"]]
    return found


def test_cpu_memory_pair_is_checked_at_plan_on_both_functions(config: Config) -> None:
    # Terraform 1.5 (required_version) lets a validation see only its own variable, so
    # the pair is a precondition; it runs at plan, before anything is created.
    for name, body in _functions(config).items():
        pre = _cpu_memory_precondition(body)
        closure = local_closure(config, " ".join(expression_parts(pre["condition"])))
        assert "var.cpu" in closure, name
        assert "var.memory" in closure, name
        message = literal(pre["error_message"])
        for allowed in ("512Mi", "1Gi", "4Gi", "8Gi", "2Gi to 16Gi", "4Gi to 24Gi", "4Gi to 32Gi"):
            assert allowed in message, (name, allowed)


def test_http_deadline_is_the_timeout_less_30_seconds(config: Config) -> None:
    http = single_block(_functions(config)["caption_http"], "service_config")
    assert http["timeout_seconds"] == "${var.http_timeout_seconds}"
    text = local_closure(config, " ".join(expression_parts(http["environment_variables"])))
    assert re.search(r"CAPTION_HTTP_DEADLINE\s*=\s*tostring\(local\.http_deadline_seconds\)", text)
    assert "var.http_timeout_seconds - 30" in config.locals["http_deadline_seconds"]
    event = single_block(_functions(config)["caption_on_upload"], "service_config")
    event_text = local_closure(config, " ".join(expression_parts(event["environment_variables"])))
    assert "CAPTION_HTTP_DEADLINE" not in event_text


def test_granted_buckets_must_be_in_the_project(config: Config) -> None:
    # The object role is a custom role of project_id; IAM only lets it be granted there.
    for name in ("existing", "allowed"):
        body = config.data["google_storage_bucket"][name]
        (post,) = single_block(body, "lifecycle")["postcondition"]
        condition = " ".join(expression_parts(post["condition"]))
        assert "self.project_number" in condition, name
        assert "data.google_project.this.number" in condition, name
        assert "project_id" in literal(post["error_message"]), name
    allowed = config.data["google_storage_bucket"]["allowed"]
    assert "var.allowed_buckets" in allowed["for_each"]
    grant = config.resource("google_storage_bucket_iam_member", "runtime_objects")
    waits_for = " ".join(grant["depends_on"])
    assert "data.google_storage_bucket.allowed" in waits_for
    assert "data.google_storage_bucket.existing" in waits_for


def test_secret_project_is_the_project_id(config: Config) -> None:
    # The project ID gives a stable plan (the provider's own secret example uses it);
    # data.google_project's number would be unknown on a first plan.
    for name, body in _functions(config).items():
        (secret,) = dynamic_blocks(
            single_block(body, "service_config"), "secret_environment_variables"
        )
        assert secret["project_id"] == "${var.project_id}", name


# Which API each kind of object calls, so which google_project_service it must wait for.
API_OF = {
    "google_project_iam_custom_role": "iam",
    "google_service_account": "iam",
    "google_service_account_iam_member": "iam",
    "google_project_iam_member": "cloudresourcemanager",
    "data.google_project": "cloudresourcemanager",
    "google_storage_bucket": "storage",
    "google_storage_bucket_object": "storage",
    "google_storage_bucket_iam_member": "storage",
    "data.google_storage_bucket": "storage",
    "data.google_storage_project_service_account": "storage",
    "google_secret_manager_secret": "secretmanager",
    "google_secret_manager_secret_iam_member": "secretmanager",
    "google_cloudfunctions2_function": "cloudfunctions",
    "google_cloud_run_v2_service_iam_member": "run",
    # Calls Service Usage (as google_project_service itself does, so it is on) to create
    # the agent of aiplatform.googleapis.com: it waits for that API's enablement.
    "google_project_service_identity": "aiplatform",
    "google_logging_metric": "logging",
    "google_monitoring_alert_policy": "monitoring",
}


def _dependencies(body: dict[str, Any]) -> set[str]:
    """Resources and data sources a body refers to, depends_on included."""
    found: set[str] = set()
    for part in expressions_in(body):
        found.update("{}.{}".format(*ref) for ref in REFERENCE_PATTERNS["resource"].findall(part))
        found.update("data.{}.{}".format(*ref) for ref in REFERENCE_PATTERNS["data"].findall(part))
    return found


def _object_body(config: Config, address: str) -> dict[str, Any]:
    if address.startswith("data."):
        _, rtype, name = address.split(".")
        return config.data[rtype][name]
    rtype, name = address.split(".")
    return config.resources[rtype][name]


def _transitive(config: Config, address: str) -> set[str]:
    seen: set[str] = set()
    pending = [address]
    while pending:
        current = pending.pop()
        for dependency in _dependencies(_object_body(config, current)):
            if dependency not in seen:
                seen.add(dependency)
                pending.append(dependency)
    return seen


def _services_of(config: Config, address: str) -> set[str]:
    body = _object_body(config, address)
    text = local_closure(config, " ".join(expression_parts(body["for_each"])))
    return set(re.findall(r'"([a-z]+)\.googleapis\.com"', text))


def test_everything_waits_for_the_apis_it_calls(config: Config) -> None:
    addresses = [f"{t}.{n}" for t, named in config.resources.items() for n in named]
    addresses += [f"data.{t}.{n}" for t, named in config.data.items() for n in named]
    unchecked = []
    for address in addresses:
        kind = address.rsplit(".", 1)[0]
        if kind == "google_project_service" or not address.startswith(("google", "data.google")):
            continue
        if kind not in API_OF:
            unchecked.append(kind)
            continue
        enabling = {
            dep for dep in _transitive(config, address) if dep.startswith("google_project_service.")
        }
        apis = set().union(*(_services_of(config, dep) for dep in enabling)) if enabling else set()
        assert API_OF[kind] in apis, f"{address} does not wait for {API_OF[kind]}.googleapis.com"
    assert unchecked == [], "say which API these call in API_OF"


def test_data_sources_wait_only_for_the_fixed_api_set(config: Config) -> None:
    # A data source whose dependency has pending changes is read at apply, leaving its
    # values unknown at plan; the mode-dependent API set must not cause that.
    for rtype, named in config.data.items():
        for name in named:
            enabling = {
                dep
                for dep in _transitive(config, f"data.{rtype}.{name}")
                if dep.startswith("google_project_service.")
            }
            assert "google_project_service.enabled" not in enabling, f"data.{rtype}.{name}"
    core = config.resource("google_project_service", "core")
    assert not re.search(r"var\.|local\.use_", local_closure(config, core["for_each"]))


# Real terraform: the CPU/memory precondition and the deadline, evaluated by the binary.


@pytest.fixture(scope="module")
def limits_module(config: Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """variables.tf, limits.tf and a terraform_data carrying the functions' precondition."""
    directory = tmp_path_factory.mktemp("tf-limits")
    shutil.copy(TERRAFORM_DIR / "variables.tf", directory / "variables.tf")
    shutil.copy(TERRAFORM_DIR / "limits.tf", directory / "limits.tf")
    pre = _cpu_memory_precondition(_functions(config)["caption_http"])
    (condition,) = expression_parts(pre["condition"])
    deadline = config.locals["http_deadline_seconds"]
    (deadline_expression,) = expression_parts(deadline)
    (directory / "harness.tf").write_text(
        'resource "terraform_data" "function" {\n'
        "  lifecycle {\n"
        "    precondition {\n"
        f"      condition     = {condition}\n"
        f"      error_message = {pre['error_message']}\n"
        "    }\n"
        "  }\n"
        "}\n"
        f"locals {{\n  http_deadline_seconds = {deadline_expression}\n}}\n",
        encoding="utf-8",
    )
    result = _terraform(["init", "-no-color", "-backend=false"], directory)
    assert result.returncode == 0, result.stderr
    return directory


@needs_terraform
@pytest.mark.parametrize(
    ("cpu", "memory", "accepted"),
    [
        ("1", "1Gi", True),
        ("0.3", "1Gi", False),
        ("0.3", "512Mi", True),
        ("0.08", "512M", True),
        ("0.5", "1Gi", True),
        ("0.5", "2Gi", False),
        ("1", "4Gi", True),
        ("1", "5Gi", False),
        ("1", "64Mi", False),
        ("2", "8Gi", True),
        ("2", "9Gi", False),
        ("4", "1Gi", False),
        ("4", "2Gi", True),
        ("4", "16Gi", True),
        ("6", "2Gi", False),
        ("6", "24Gi", True),
        ("8", "4Gi", True),
        ("8", "33Gi", False),
    ],
)
def test_cpu_memory_pairs_at_plan(
    limits_module: Path, cpu: str, memory: str, accepted: bool
) -> None:
    result = _plan(limits_module, cpu=cpu, memory=memory, max_instance_request_concurrency="1")
    if accepted:
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode != 0, f"cpu={cpu} memory={memory} was accepted"
        assert "a pair Cloud Run accepts" in " ".join(result.stderr.split()), result.stderr


@needs_terraform
@pytest.mark.parametrize(("timeout", "deadline"), [("540", "510"), ("3600", "3570"), ("40", "20")])
def test_http_deadline_by_terraform(limits_module: Path, timeout: str, deadline: str) -> None:
    args = ["console", "-no-color", "-var", f"http_timeout_seconds={timeout}"]
    for name, value in REQUIRED_VARS.items():
        args += ["-var", f"{name}={value}"]
    assert TERRAFORM is not None
    result = subprocess.run(
        [TERRAFORM, *args],
        cwd=limits_module,
        input="tostring(local.http_deadline_seconds)\n",
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "CHECKPOINT_DISABLE": "1", "TF_CLI_CONFIG_FILE": os.devnull},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().strip('"') == deadline


def test_a_daily_budget_brings_its_ledger_grant_a_log_metric_and_an_alert(config: Config) -> None:
    """Only with daily_budget_usd: the function may write the ledger under the budget
    prefix (and nowhere else), and what the budget turns away is counted and alerted on."""
    grant = config.resource("google_storage_bucket_iam_member", "runtime_budget_ledger")
    assert "local.use_budget" in grant["for_each"]
    assert role_permissions(config, grant["role"]) == {
        "storage.objects.create",
        "storage.objects.delete",
    }
    (condition,) = grant["condition"]
    assert literal(condition["expression"]) == (
        'resource.name.startsWith("projects/_/buckets/${each.value}'
        '/objects/${var.caption_budget_prefix}")'
    )
    metric = config.resource("google_logging_metric", "budget_exhausted")
    assert "local.use_budget" in metric["count"]
    assert 'jsonPayload.reason=\\"budget-exhausted\\"' in metric["filter"] or (
        'jsonPayload.reason="budget-exhausted"' in literal(metric["filter"])
    )
    alert = config.resource("google_monitoring_alert_policy", "budget_exhausted")
    assert alert["count"] == metric["count"]
    assert "google_logging_metric.budget_exhausted" in json.dumps(alert["conditions"])
    assert alert["notification_channels"] == "${var.alert_notification_channels}"
    # The application reads the very reason the metric counts.
    spending = (TERRAFORM_DIR.parent / "src" / "captioner" / "spending.py").read_text()
    assert '"budget-exhausted"' in spending
