"""Offline JSON schemas for the custom resources the manifests use (Strimzi, prometheus-operator).

kubernetes-validate knows only built-in kinds. These schemas are written here after the upstream CRDs
(kafka.strimzi.io/v1beta2 from Strimzi 0.4x, monitoring.coreos.com/v1 from prometheus-operator 0.7x/0.8x):
they cover the fields distillery's manifests use, with the upstream types, enums and required keys, and reject
unknown keys where the manifests set them, so a typo fails here instead of in the operator. They are not the
complete upstream schemas.
"""

from __future__ import annotations

from typing import Any

DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
QUANTITY = {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": r"^[0-9.]+([eEinumkKMGTP]*[-+]?[0-9]*)$"}]}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OPEN_OBJECT = {"type": "object"}


def strict(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


def resource(spec: dict[str, Any]) -> dict[str, Any]:
    return strict(
        {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": strict(
                {
                    "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
                    "namespace": {"type": "string"},
                    "labels": STRING_MAP,
                    "annotations": STRING_MAP,
                },
                required=["name"],
            ),
            "spec": spec,
        },
        required=["apiVersion", "kind", "metadata", "spec"],
    )


RESOURCES = strict(
    {
        "requests": {"type": "object", "additionalProperties": QUANTITY},
        "limits": {"type": "object", "additionalProperties": QUANTITY},
        "claims": {"type": "array"},
    }
)

VOLUME = strict(
    {
        "id": {"type": "integer", "minimum": 0},
        "type": {"enum": ["ephemeral", "persistent-claim"]},
        "size": {"type": "string"},
        "sizeLimit": {"type": "string", "pattern": r"^([0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"},
        "class": {"type": "string"},
        "deleteClaim": {"type": "boolean"},
        "kraftMetadata": {"enum": ["shared"]},
        "selector": STRING_MAP,
        "overrides": {"type": "array"},
    },
    required=["type"],
)

KAFKA = resource(
    strict(
        {
            "kafka": strict(
                {
                    "version": {"type": "string"},
                    "metadataVersion": {"type": "string"},
                    "replicas": {"type": "integer", "minimum": 1},
                    "listeners": {
                        "type": "array",
                        "minItems": 1,
                        "items": strict(
                            {
                                "name": {"type": "string", "pattern": r"^[a-z0-9]{1,11}$"},
                                "port": {"type": "integer", "minimum": 9092},
                                "type": {
                                    "enum": ["internal", "route", "loadbalancer", "nodeport", "ingress", "cluster-ip"]
                                },
                                "tls": {"type": "boolean"},
                                "authentication": OPEN_OBJECT,
                                "configuration": OPEN_OBJECT,
                                "networkPolicyPeers": {"type": "array"},
                            },
                            required=["name", "port", "type", "tls"],
                        ),
                    },
                    "config": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                    "storage": OPEN_OBJECT,
                    "resources": RESOURCES,
                    "template": OPEN_OBJECT,
                    "metricsConfig": OPEN_OBJECT,
                    "rack": OPEN_OBJECT,
                    "authorization": OPEN_OBJECT,
                    "jvmOptions": OPEN_OBJECT,
                    "logging": OPEN_OBJECT,
                },
                required=["listeners"],
            ),
            "entityOperator": strict(
                {"topicOperator": OPEN_OBJECT, "userOperator": OPEN_OBJECT, "template": OPEN_OBJECT}
            ),
            "cruiseControl": OPEN_OBJECT,
            "kafkaExporter": OPEN_OBJECT,
            "clientsCa": OPEN_OBJECT,
            "clusterCa": OPEN_OBJECT,
            "maintenanceTimeWindows": {"type": "array", "items": {"type": "string"}},
        },
        required=["kafka"],
    )
)

KAFKA_NODE_POOL = resource(
    strict(
        {
            "replicas": {"type": "integer", "minimum": 0},
            "roles": {"type": "array", "minItems": 1, "items": {"enum": ["controller", "broker"]}},
            "storage": strict(
                {
                    "type": {"enum": ["ephemeral", "persistent-claim", "jbod"]},
                    "volumes": {"type": "array", "items": VOLUME},
                    **{k: v for k, v in VOLUME["properties"].items() if k not in ("type",)},
                },
                required=["type"],
            ),
            "resources": RESOURCES,
            "jvmOptions": OPEN_OBJECT,
            "template": OPEN_OBJECT,
        },
        required=["replicas", "roles", "storage"],
    )
)

KAFKA_TOPIC = resource(
    strict(
        {
            "topicName": {"type": "string"},
            "partitions": {"type": "integer", "minimum": 1},
            "replicas": {"type": "integer", "minimum": 1, "maximum": 32767},
            "config": {"type": "object", "additionalProperties": {"type": ["string", "integer", "number", "boolean"]}},
        }
    )
)

LABEL_SELECTOR = strict(
    {
        "matchLabels": STRING_MAP,
        "matchExpressions": {
            "type": "array",
            "items": strict(
                {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
                required=["key", "operator"],
            ),
        },
    }
)

SERVICE_MONITOR = resource(
    strict(
        {
            "selector": LABEL_SELECTOR,
            "namespaceSelector": strict({"any": {"type": "boolean"}, "matchNames": {"type": "array"}}),
            "jobLabel": {"type": "string"},
            "targetLabels": {"type": "array", "items": {"type": "string"}},
            "podTargetLabels": {"type": "array", "items": {"type": "string"}},
            "sampleLimit": {"type": "integer"},
            "attachMetadata": OPEN_OBJECT,
            "endpoints": {
                "type": "array",
                "items": strict(
                    {
                        "port": {"type": "string"},
                        "targetPort": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
                        "path": {"type": "string"},
                        "scheme": {"enum": ["http", "https"]},
                        "params": OPEN_OBJECT,
                        "interval": DURATION,
                        "scrapeTimeout": DURATION,
                        "honorLabels": {"type": "boolean"},
                        "honorTimestamps": {"type": "boolean"},
                        "relabelings": {"type": "array"},
                        "metricRelabelings": {"type": "array"},
                        "tlsConfig": OPEN_OBJECT,
                        "authorization": OPEN_OBJECT,
                        "bearerTokenSecret": OPEN_OBJECT,
                        "followRedirects": {"type": "boolean"},
                        "enableHttp2": {"type": "boolean"},
                        "filterRunning": {"type": "boolean"},
                    }
                ),
            },
        },
        required=["selector"],
    )
)

PROMETHEUS_RULE = resource(
    strict(
        {
            "groups": {
                "type": "array",
                "items": strict(
                    {
                        "name": {"type": "string", "minLength": 1},
                        "interval": DURATION,
                        "limit": {"type": "integer"},
                        "labels": STRING_MAP,
                        "query_offset": DURATION,
                        "partial_response_strategy": {"type": "string"},
                        "rules": {
                            "type": "array",
                            "items": strict(
                                {
                                    "alert": {"type": "string"},
                                    "record": {"type": "string"},
                                    "expr": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
                                    "for": DURATION,
                                    "keep_firing_for": DURATION,
                                    "labels": STRING_MAP,
                                    "annotations": STRING_MAP,
                                },
                                required=["expr"],
                            ),
                        },
                    },
                    required=["name"],
                ),
            }
        }
    )
)

#: (apiVersion, kind) → schema.
# cert-manager.io/v1 (cert-manager 1.x): the Issuer kinds and Certificate fields the security component uses.
ISSUER_REF = strict({"name": {"type": "string"}, "kind": {"enum": ["Issuer", "ClusterIssuer"]},
                     "group": {"type": "string"}}, ["name"])  # fmt: skip
ISSUER = resource(
    strict(
        {
            "selfSigned": strict({"crlDistributionPoints": {"type": "array", "items": {"type": "string"}}}),
            "ca": strict({"secretName": {"type": "string"}}, ["secretName"]),
        }
    )
)
CERTIFICATE = resource(
    strict(
        {
            "secretName": {"type": "string"},
            "commonName": {"type": "string", "maxLength": 64},
            "isCA": {"type": "boolean"},
            "duration": {"type": "string"},
            "renewBefore": {"type": "string"},
            "dnsNames": {"type": "array", "items": {"type": "string"}},
            "ipAddresses": {"type": "array", "items": {"type": "string"}},
            "usages": {
                "type": "array",
                "items": {
                    "enum": [
                        "digital signature",
                        "key encipherment",
                        "server auth",
                        "client auth",
                        "cert sign",
                        "crl sign",
                    ]
                },
            },
            "privateKey": strict(
                {
                    "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                    "size": {"type": "integer"},
                    "encoding": {"enum": ["PKCS1", "PKCS8"]},
                    "rotationPolicy": {"enum": ["Never", "Always"]},
                }
            ),
            "issuerRef": ISSUER_REF,
        },
        ["secretName", "issuerRef"],
    )
)

SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("cert-manager.io/v1", "Issuer"): ISSUER,
    ("cert-manager.io/v1", "Certificate"): CERTIFICATE,
    ("kafka.strimzi.io/v1beta2", "Kafka"): KAFKA,
    ("kafka.strimzi.io/v1beta2", "KafkaNodePool"): KAFKA_NODE_POOL,
    ("kafka.strimzi.io/v1beta2", "KafkaTopic"): KAFKA_TOPIC,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
}
