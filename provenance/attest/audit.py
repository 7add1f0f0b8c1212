"""The signed memorization audit: its own in-toto Statement over the same subjects as the provenance.

Predicate type AUDIT_PREDICATE_TYPE (docs/audit.md). The shape follows the in-toto `test-result`
predicate and the proposed `eval-result` one: `result`, the `configuration` it ran with (as
resource descriptors: the recipe, the dataset manifest, the weights), and the measurements.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .._internal.jsonstrict import JSONObject

AUDIT_PREDICATE_TYPE = "https://provenance.invalid/predicates/memorization-audit/v1"
AUDIT_FILE = "audit.intoto.jsonl"


def audit_statement(provenance_statement: JSONObject, audit: JSONObject, *, manifest_digest: dict[str, str],
                    audit_json_digest: dict[str, str]) -> JSONObject:
    """The audit Statement: subjects copied from the provenance statement, so both bind the same files."""
    bd = provenance_statement["predicate"]["buildDefinition"]
    recipe = bd["externalParameters"]["recipe"]
    outputs = provenance_statement["predicate"]["runDetails"]["provenance_outputs"]
    return {
        "_type": provenance_statement["_type"],
        "subject": [dict(s) for s in provenance_statement["subject"]],
        "predicateType": AUDIT_PREDICATE_TYPE,
        "predicate": {
            "result": "MEASURED",
            "configuration": [
                {"name": "recipe", "uri": recipe["path"], "digest": dict(recipe["digest"])},
                {"name": "dataset-manifest", "digest": dict(manifest_digest)},
                {"name": "weights", "digest": {outputs["tensors"]["algorithm"]: outputs["tensors"]["digest"]}},
                {"name": "audit.json", "digest": dict(audit_json_digest)},
            ],
            "audit": audit,
        },
    }
