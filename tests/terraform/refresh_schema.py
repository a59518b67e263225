"""Rebuild tests/terraform/provider_schema.json from the prebuilt CDK provider wheels.

Why: `terraform validate` needs the providers, which cannot be downloaded where the
tests run. The prebuilt CDK bindings on PyPI are generated from a stated provider
release and carry its whole schema: for every resource and data source, each
argument and attribute with its `computed / optional / required` flags, and each
nested block with its own members. This script keeps only the resource and data
source types terraform/ uses, so the committed JSON stays small, and
tests/terraform/test_provider_schema.py checks the module against it offline.

Sources (each wheel's README names the provider release it was generated from):

    cdktf-cdktf-provider-google 16.12.1  ->  hashicorp/google  6.50.0
    cdktn-provider-google       21.1.0   ->  hashicorp/google  8.7.0
    cdktf-cdktf-provider-google-beta 16.12.1 -> hashicorp/google-beta 6.50.0
    cdktn-provider-google-beta  21.1.0   ->  hashicorp/google-beta 8.7.0
    cdktn-provider-archive      14.0.1   ->  hashicorp/archive 2.8.1

Two google releases bracket what versions.tf admits (6.x to 8.x): the module must
be valid against both. google-beta likewise; its types are named google_* too, so a
type is looked up in google-beta when its block says `provider = google-beta` (the
provider's local name, as versions.tf declares it), else in the provider its name
starts with.

Refresh (needs the package registry once, then nothing):

    .venv/bin/python tests/terraform/refresh_schema.py            # download and rebuild
    .venv/bin/python tests/terraform/refresh_schema.py --wheels DIR  # wheels already in DIR

Run it again whenever terraform/ starts using a new resource or data source type (the
schema test says so), or to move to newer provider releases (edit WHEELS below).

How the schema is read: each wheel holds a jsii assembly (a tarball with the
assembly's .jsii JSON and one compiled JavaScript file per resource and data source).

- What can be set comes from the jsii structs: `<Class>Config` for a resource or
  data source, `<Block>` for a nested block. Each property says whether it is
  optional, and its documentation links to the registry page with the Terraform name
  as anchor (`.../cloudfunctions2_function#build_config`).
- What can be read comes from the JavaScript classes: each getter reads its
  Terraform attribute by name (`this.getStringAttribute('uri')`), and each nested
  block is built as `new <Block>OutputReference(this, "service_config")` (at most
  one) or `new <Block>List(this, "secret_environment_variables", ...)` (repeated).
  A member that can be read but not set is computed only.
- The resource class names its Terraform type (`tfResourceType`).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import hcl2

HERE = Path(__file__).resolve().parent
TERRAFORM_DIR = HERE.parents[1] / "terraform"
OUTPUT = HERE / "provider_schema.json"

# (PyPI distribution, version, provider, provider release it was generated from)
WHEELS = [
    ("cdktf-cdktf-provider-google", "16.12.1", "google", "6.50.0"),
    ("cdktn-provider-google", "21.1.0", "google", "8.7.0"),
    ("cdktf-cdktf-provider-google-beta", "16.12.1", "google-beta", "6.50.0"),
    ("cdktn-provider-google-beta", "21.1.0", "google-beta", "8.7.0"),
    ("cdktn-provider-archive", "14.0.1", "archive", "2.8.1"),
]

CLASS_LINE = re.compile(r"^class (\w+) extends ([\w.]+)", re.M)
GETTER = re.compile(r"get \w+\(\) \{\s*return [^;]*?get\w*Attribute\('(\w+)'\)")
DOC_ANCHOR = re.compile(r"registry\.terraform\.io/providers/[^ }]*#(\w+)[ }]")
NESTED = re.compile(r"(?:this\.)?_(\w+) = new (\w+)\(this, \"(\w+)\"")
# Computed maps are objects too (`new cdktf.StringMap(this, "effective_labels")`).
COMPUTED_MAP = re.compile(r"new cdkt[nf]\.\w+Map\(this, \"(\w+)\"")
STATIC_TYPE = re.compile(r"static tfResourceType = \"(\w+)\"")
ASSIGNED_TYPE = re.compile(r"^(\w+)\.tfResourceType = \"(\w+)\"", re.M)
README_RELEASE = re.compile(r"hashicorp/([\w-]+) provider version (\d+\.\d+\.\d+)")


def provider_of(tf_type: str, body: dict[str, Any]) -> str:
    """The provider a block is served by: its `provider` meta-argument, else its type's prefix.

    `provider = google-beta` and `provider = google-beta.alias` both name google-beta.
    """
    explicit = body.get("provider")
    if isinstance(explicit, str):
        return explicit.strip('"').removeprefix("${").removesuffix("}").split(".")[0]
    return tf_type.split("_", 1)[0]


def used_types() -> dict[str, dict[str, set[str]]]:
    """provider -> kind -> resource and data source types declared in terraform/*.tf."""
    found: dict[str, dict[str, set[str]]] = {}
    for path in sorted(TERRAFORM_DIR.glob("*.tf")):
        with path.open(encoding="utf-8") as handle:
            parsed = hcl2.load(handle)
        for kind in ("resource", "data"):
            for entry in parsed.get(kind, []):
                for key, named in entry.items():
                    tf_type = key.strip('"')
                    for body in named.values():
                        provider = provider_of(tf_type, body)
                        kinds = found.setdefault(provider, {"resource": set(), "data": set()})
                        kinds[kind].add(tf_type)
    return found


def split_classes(js: str) -> dict[str, str]:
    """Class name -> its source text (up to the next class)."""
    starts = list(CLASS_LINE.finditer(js))
    chunks = {}
    for index, match in enumerate(starts):
        end = starts[index + 1].start() if index + 1 < len(starts) else len(js)
        chunks[match.group(1)] = js[match.start() : end]
    return chunks


class Library:
    """One assembly: its JavaScript classes and its jsii types, indexed by class name."""

    def __init__(self, files: dict[str, str], jsii_types: dict[str, Any]) -> None:
        self.classes: dict[str, str] = {}
        self.types: dict[tuple[str, str], str] = {}
        self.structs = {t["name"]: t for t in jsii_types.values() if t.get("datatype")}
        for text in files.values():
            chunks = split_classes(text)
            self.classes.update(chunks)
            for name, chunk in chunks.items():
                base = CLASS_LINE.search(chunk)
                assert base is not None
                kind = {"TerraformResource": "resource", "TerraformDataSource": "data"}.get(
                    base.group(2).split(".")[-1]
                )
                if kind is None:
                    continue
                static = STATIC_TYPE.search(chunk)
                tf_type = static.group(1) if static else None
                if tf_type is None:
                    for cls, assigned in ASSIGNED_TYPE.findall(text):
                        if cls == name:
                            tf_type = assigned
                if tf_type:
                    self.types[(kind, tf_type)] = name

    def settable(self, struct_name: str) -> dict[str, bool]:
        """Terraform name -> required, for every property of a jsii struct."""
        found = {}
        for prop in self.structs[struct_name].get("properties", []):
            docs = prop.get("docs", {})
            anchor = DOC_ANCHOR.search(docs.get("remarks", "") + " " + docs.get("summary", ""))
            assert anchor, f"{struct_name}.{prop['name']}: no registry link"
            found[anchor.group(1)] = not prop.get("optional", False)
        return found

    def block(self, class_name: str, struct_name: str) -> dict[str, Any]:
        chunk = self.classes[class_name]
        nested = {tf_name: cls for _field, cls, tf_name in NESTED.findall(chunk)}
        readable = set(GETTER.findall(chunk)) | set(nested) | set(COMPUTED_MAP.findall(chunk))
        settable = self.settable(struct_name) if struct_name in self.structs else {}
        node: dict[str, Any] = {"arguments": {}, "attributes": [], "blocks": {}}
        for name in sorted(readable | set(settable)):
            if name in nested:
                cls = nested[name]
                many = cls.endswith("List")
                stem = cls[: -len("List")] if many else cls[: -len("OutputReference")]
                node["blocks"][name] = {
                    "nesting": "list" if many else "single",
                    "required": settable.get(name, False),
                    "computed_only": name not in settable,
                    **self.block(stem + "OutputReference", stem),
                }
            elif name in settable:
                node["arguments"][name] = "required" if settable[name] else "optional"
            else:
                node["attributes"].append(name)
        return node


def read_wheel(path: Path) -> tuple[str, str, dict[str, str], dict[str, Any]]:
    """(provider, release, lib js files, jsii types) of one prebuilt provider wheel."""
    with zipfile.ZipFile(path) as wheel:
        metadata = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        release = README_RELEASE.search(wheel.read(metadata).decode("utf-8"))
        assert release, f"{path.name}: no provider release in its README"
        tarball = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
        files = {}
        types: dict[str, Any] = {}
        with tarfile.open(fileobj=io.BytesIO(wheel.read(tarball))) as assembly:
            for member in assembly.getmembers():
                if not member.isfile():
                    continue
                if re.fullmatch(r"package/lib/[^/]+/index\.js", member.name):
                    extracted = assembly.extractfile(member)
                    assert extracted is not None
                    files[member.name] = extracted.read().decode("utf-8")
                elif member.name == "package/.jsii":
                    extracted = assembly.extractfile(member)
                    assert extracted is not None
                    types = json.load(extracted)["types"]
    return release.group(1), release.group(2), files, types


def build(wheel_dir: Path) -> dict[str, Any]:
    wanted = used_types()
    providers: dict[str, dict[str, Any]] = {}
    sources = {}
    for dist, version, provider, expected_release in WHEELS:
        pattern = f"{dist.replace('-', '_')}-{version}-*.whl"
        found = sorted(wheel_dir.glob(pattern))
        assert len(found) == 1, f"{pattern} not in {wheel_dir}"
        path = found[0]
        name, release, files, types = read_wheel(path)
        assert (name, release) == (provider, expected_release), (path.name, name, release)
        library = Library(files, types)
        schema: dict[str, Any] = {"resource": {}, "data": {}}
        for kind, type_names in wanted.get(provider, {}).items():
            for tf_type in sorted(type_names):
                class_name = library.types.get((kind, tf_type))
                assert class_name, f"{kind} {tf_type} not in {path.name}"
                schema[kind][tf_type] = library.block(class_name, class_name + "Config")
        providers.setdefault(provider, {})[release] = schema
        sources[f"{provider}@{release}"] = f"PyPI {dist}=={version}"
    return {
        "about": (
            "Schemas of the resource and data source types terraform/ uses, per provider "
            "release, read from prebuilt CDK provider wheels by tests/terraform/"
            "refresh_schema.py (see its docstring to refresh). arguments: name -> "
            "required | optional; attributes: computed-only names; blocks: "
            "nesting single|list, required, computed_only, and their own members."
        ),
        "sources": sources,
        "providers": providers,
    }


def download(target: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--dest",
            str(target),
            *[f"{dist}=={version}" for dist, version, _provider, _release in WHEELS],
        ],
        check=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, help="folder already holding the wheels")
    args = parser.parse_args()
    if args.wheels:
        schema = build(args.wheels)
    else:
        with tempfile.TemporaryDirectory() as scratch:
            download(Path(scratch))
            schema = build(Path(scratch))
    OUTPUT.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(HERE.parents[1])}: {', '.join(schema['sources'])}")


if __name__ == "__main__":
    main()
