"""Every config key an error message names exists in the config schema.

A message that names a key a user cannot find (say `eval.tasks.local_data` for
`evaluate.tasks.local_data`) sends them hunting. The keys are read from the sources: the
workflow's `config_error(<key>, ...)` calls and dotted study keys in their messages, and the
package's messages that point at the workflow ("config key X", "workflow: X", "check X").
Each is walked through workflow/schemas/config.schema.yaml; placeholders such as `<name>` or
`{_name}` stand for a user's own name (a model, calibration set or method).
"""

from __future__ import annotations

import re

import yaml

from .conftest import ROOT

SCHEMA = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
TOP = set(SCHEMA["properties"])
PATH = r"[a-z_]+(?:\.(?:<\w+>|\{\w+\}|[A-Za-z_]+))+"


def resolves(key: str) -> bool:
    node = SCHEMA
    for part in key.split("."):
        if "$ref" in node:
            node = SCHEMA["$defs"][node["$ref"].rsplit("/", 1)[1]]
        props = node.get("properties", {})
        if part in props:
            node = props[part]
        elif isinstance(node.get("additionalProperties"), dict) and (part.startswith(("<", "{")) or not props):
            node = node["additionalProperties"]
        else:
            return False
    return True


def named_keys() -> set[str]:
    keys = set()
    common = (ROOT / "workflow/rules/common.smk").read_text()
    keys |= set(re.findall(r'config_error\(f?"([^"]+)"', common))
    for message in re.findall(r'config_error\([^\n]*', common):  # keys a message tells the user to set
        keys |= {k for k in re.findall(PATH, message) if k.split(".")[0] in TOP}
    for path in (ROOT / "blockpruner").rglob("*.py"):
        keys |= set(re.findall(rf"(?:config key|workflow:|check) ({PATH})", path.read_text()))
    return keys


def test_every_config_key_named_in_a_message_exists():
    keys = named_keys()
    assert {"evaluate.tasks.local_data", "models.<name>.trust_remote_code", "calibration.{_name}.path",
            "search.shards", "evaluate.perplexity.path"} <= keys, sorted(keys)
    assert sorted(k for k in keys if not resolves(k)) == []


def test_the_check_rejects_keys_that_do_not_exist():
    assert not resolves("eval.tasks.local_data") and not resolves("evaluate.tasks.local_dir")
    assert not resolves("models.<name>.trust_code") and resolves("resources.search_step.mem_mb")
